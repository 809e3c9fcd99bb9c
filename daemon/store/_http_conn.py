"""One keep-alive HTTP/1.1 connection of the lean data path (``_http``), as an
``asyncio.BufferedProtocol``: the kernel writes a range GET's body straight into a slice
of its destination, so each byte is written once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import cast

from tensorferry.daemon.store._http_head import (
    HEAD_MAX,
    check_range,
    ends_with_connection,
    error_body,
    parse_head,
)
from tensorferry.daemon.store.base import METER, TIMING, BodyMeter, GetTiming

#: Body bytes the kernel gathers before it wakes us (SO_RCVLOWAT). A slow connection
#: delivers a few KiB at a time; each wake-up is a trip through the event loop, and 132 such
#: connections cost the daemon twice the CPU per GB of the same bytes arriving in bursts
#: (0.85 CPU-s/GB; 0.50 at 256 KiB; 0.30-0.33 at 1 MiB, under loopback's 0.37).
LOWAT = 1 << 20
_SURPLUS = "the store sent more bytes than the range it announced"


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self.body = bytearray()


class Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._head = bytearray(HEAD_MAX)
        self._head_view = memoryview(self._head)
        self._head_len = 0
        self._dest: memoryview | None = None
        self._pos = 0
        self._want = 0
        self._in_body = False
        self._response: Response | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._expect_start = 0
        self._etag: str | None = None
        #: A 206 without Content-Length: its body ends with the connection, which must
        #: come right after the range's last byte.
        self._until_close = False
        self._last_io = 0.0
        self._idle_timeout = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._meter: BodyMeter | None = None
        self._timing: GetTiming | None = None
        #: A CONNECT answer: the head is all there is (bytes after it belong to TLS).
        self._head_only = False
        #: Whether the current request got any byte back (a kept-alive connection that the
        #: peer closed meanwhile fails before that, and the request may be sent again).
        self.answered = False
        #: The TCP socket, where the kernel may gather body bytes (``LOWAT``); None under
        #: uvloop's TLS, which holds bytes back (``_http_tls`` sets its own marks).
        self._sock: socket.socket | None = None
        self._lowat = 1

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if transport.get_extra_info("sslcontext") is None:
            self._sock = transport.get_extra_info("socket")

    def encrypted(self) -> None:  # uvloop's TLS now runs over it (a tunnel through a proxy)
        self._sock = None

    def _gather(self, nbytes: int) -> None:
        """Wake for no fewer than ``nbytes`` (1: for any). Never more than the body has
        left: the kernel would wait for bytes that are not coming."""
        if self._sock is not None and nbytes != self._lowat:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
                self._lowat = nbytes
            except OSError:
                self._sock = None  # not a TCP socket after all: read as it comes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and (
            (self._in_body and self._until_close and self._pos == self._want)
            or (not self._in_body and ends_with_connection(response.headers))
        ):
            # A body delimited by the end of the connection (HTTP/1.0 style, as proxies'
            # error pages often are): complete now.
            response.headers["connection"] = "close"
            if not self._in_body:
                response.body = bytearray(self._head[: self._head_len])
            self._finish()
            return
        if self._waiter is not None and not self._waiter.done():
            got = f"after {self._pos} of {self._want} body bytes" if self._in_body else ""
            self._waiter.set_exception(ConnectionError(f"connection closed {got}".strip()))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._plain_buffer()

    def _plain_buffer(self) -> memoryview:  # where the next bytes go (TLS decrypts there)
        if self._in_body and self._dest is not None and self._pos < self._want:
            return self._dest[self._pos : self._want]
        if self._head_len >= HEAD_MAX:
            self._head_len = 0  # unexpected bytes; the response handler already failed
        return self._head_view[self._head_len :]

    def buffer_updated(self, nbytes: int) -> None:
        self._received(nbytes)

    def _received(self, nbytes: int) -> None:  # nbytes landed in the last _plain_buffer()
        self._last_io = time.monotonic()
        self.answered = True
        if self._timing is not None and self._timing.first_byte is None:
            self._timing.answered(self._last_io)
        if self._in_body:
            if self._pos >= self._want:  # after a body that was to end with the connection
                self._fail(ConnectionError(_SURPLUS))
                return
            self._pos += nbytes
            if self._meter is not None:
                self._meter.bytes += nbytes
            if self._pos < self._want:
                if self._lowat > self._want - self._pos:
                    self._gather(1)
            elif self._until_close:
                self._gather(1)  # for any byte past the range, which must not come
            else:
                self._finish()
            return
        self._head_len += nbytes
        if self._response is not None:  # collecting an error body
            self._collect_error_body()
            return
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len >= HEAD_MAX:
                self._fail(ConnectionError("response head larger than 64 KiB"))
            return
        self._on_head(end + 4)

    # -- request/response ---------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        if self._lowat > 1:
            self._gather(1)  # the next answer's head may be short
        response, self._response = self._response, None
        self._in_body = False
        self._dest = None
        if self._waiter is not None and not self._waiter.done() and response is not None:
            self._waiter.set_result(response)

    def _on_head(self, head_end: int) -> None:
        try:
            status, headers = parse_head(bytes(self._head[: head_end - 4]))
        except ValueError as exc:
            self._fail(ConnectionError(str(exc)))
            return
        extra = self._head_len - head_end
        response = Response(status, headers)
        self._response = response
        if self._head_only and 200 <= status < 300:
            # The tunnel is open: what follows belongs to TLS, which we have not started.
            self._head_len = 0
            if extra:
                self._fail(ConnectionError("the proxy sent bytes after its CONNECT answer"))
            else:
                self._finish()
            return
        if status != 206:
            # An error (a refused CONNECT too): bytes after the head are its body.
            self._head[:extra] = self._head[head_end : self._head_len]
            self._head_len = extra
            self._collect_error_body()
            return
        problem = check_range(headers, self._expect_start, self._want, self._etag)
        if problem is not None:
            self._fail(problem)
            return
        assert self._dest is not None
        if extra > self._want:
            self._fail(ConnectionError(_SURPLUS))
            return
        self._until_close = "content-length" not in headers
        self._dest[:extra] = self._head_view[head_end : self._head_len]
        self._pos = extra
        self._head_len = 0
        self._in_body = True
        if self._pos >= self._want:
            if not self._until_close:
                self._finish()
        elif self._want - self._pos >= 2 * LOWAT:
            self._gather(LOWAT)

    def _collect_error_body(self) -> None:
        response = self._response
        assert response is not None
        data = self._head[: self._head_len]
        found = error_body(response.headers, data)
        if found is None and self._head_len >= HEAD_MAX:
            found = bytes(data), False
        if found is not None:
            response.body = bytearray(found[0])
            if not found[1]:  # a body not read exactly to its end leaves the stream unknown
                response.headers["connection"] = "close"
            self._head_len = 0
            self._finish()

    def _check_idle(self) -> None:
        """Fail the request once the store has sent nothing for ``idle_timeout`` seconds.

        An inactivity timeout, not a deadline: a large range on a slow but live link goes
        on, a stalled one fails fast (and the fetch scheduler retries it).
        """
        idle = time.monotonic() - self._last_io
        if idle >= self._idle_timeout and self._lowat > 1:
            # Bytes may be waiting below the mark: take them, and judge a moment later.
            self._gather(1)
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(min(1.0, self._idle_timeout), self._check_idle)
        elif idle >= self._idle_timeout:
            self._fail(TimeoutError(f"no data from the store for {idle:.1f} s"))
        else:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_timeout - idle, self._check_idle)

    def _send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]  # request() checked it

    async def tunnel(self, head: bytes, idle_timeout: float) -> Response:
        """Send a CONNECT ``head`` and return the proxy's answer; the connection is then
        the proxy's tunnel (the caller starts TLS on it)."""
        self._head_only = True
        try:
            return await self.request(head, memoryview(bytearray()), 0, idle_timeout)
        finally:
            self._head_only = False

    async def request(
        self,
        head: bytes,
        dest: memoryview,
        start: int,
        idle_timeout: float,
        etag: str | None = None,
    ) -> Response:
        """Send ``head`` and land a 206's body in ``dest`` (bytes from ``start`` of the
        version whose ETag is ``etag``, when known); any other answer comes back with its
        body (an error) unless it cannot be read."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._last_io = time.monotonic()
        self._idle_timeout = idle_timeout
        self._idle_timer = loop.call_later(idle_timeout, self._check_idle)
        self._dest, self._pos, self._want = dest, 0, len(dest)
        # Callbacks run outside the task's context: take the load's meter along now.
        self._meter = METER.get()
        # A CONNECT answer is not the range's first byte: the hedger must not see it.
        self._timing = None if self._head_only else TIMING.get()
        self._expect_start = start
        self._etag = etag
        self._until_close = False
        self._in_body = False
        self._response = None
        self._head_len = 0
        self.answered = False
        try:
            try:
                self._send(head)
            except RuntimeError as exc:  # uvloop: the transport closed under us
                raise ConnectionResetError(str(exc)) from None
            if self._timing is not None:
                self._timing.sent, self._timing.first_byte = time.monotonic(), None
            return await self._waiter
        finally:
            self._waiter = None
            self._timing = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
