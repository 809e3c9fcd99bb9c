"""The lean data path: HTTP/1.1 range GETs whose bodies land straight in their destination.

aiobotocore costs 2-3x the CPU per byte of this path (see docs/performance.md): its body
is read into fresh bytes objects and copied again. Here an ``asyncio.BufferedProtocol``
hands the kernel a slice of the destination (the arena on CPU hosts, a ring slot on GPU
hosts), so each byte is written once. Signing stays with botocore (presigned URLs).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.parse
from collections import defaultdict
from typing import cast

from tensorferry.errors import StoreUnavailable

_HEAD_MAX = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpError(Exception):
    """A non-206 answer; ``status`` and the S3 error body let the caller map it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self.body = bytearray()


class _Conn(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._head = bytearray(_HEAD_MAX)
        self._head_view = memoryview(self._head)
        self._head_len = 0
        self._dest: memoryview | None = None
        self._pos = 0
        self._want = 0
        self._in_body = False
        self._response: _Response | None = None
        self._waiter: asyncio.Future[_Response] | None = None
        self._expect_start = 0
        self._last_io = 0.0
        self._idle_timeout = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            got = f"after {self._pos} of {self._want} body bytes" if self._in_body else ""
            self._waiter.set_exception(ConnectionError(f"connection closed {got}".strip()))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._in_body and self._dest is not None and self._pos < self._want:
            return self._dest[self._pos : self._want]
        if self._head_len >= _HEAD_MAX:
            self._head_len = 0  # unexpected bytes; the response handler already failed
        return self._head_view[self._head_len :]

    def buffer_updated(self, nbytes: int) -> None:
        self._last_io = time.monotonic()
        if self._in_body:
            self._pos += nbytes
            if self._pos >= self._want:
                self._finish()
            return
        self._head_len += nbytes
        if self._response is not None:  # collecting an error body
            self._collect_error_body()
            return
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len >= _HEAD_MAX:
                self._fail(ConnectionError("response head larger than 64 KiB"))
            return
        self._on_head(end + 4)

    def eof_received(self) -> bool | None:
        return False

    # -- request/response ---------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        response, self._response = self._response, None
        self._in_body = False
        self._dest = None
        if self._waiter is not None and not self._waiter.done() and response is not None:
            self._waiter.set_result(response)

    def _on_head(self, head_end: int) -> None:
        lines = bytes(self._head[: head_end - 4]).decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._fail(ConnectionError(f"malformed status line {lines[0]!r}"))
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        extra = self._head_len - head_end
        response = _Response(status, headers)
        self._response = response
        if status != 206:
            self._head[:extra] = self._head[head_end : self._head_len]
            self._head_len = extra
            self._collect_error_body()
            return
        problem = self._check_range(headers)
        if problem is not None:
            self._fail(problem)
            return
        assert self._dest is not None
        if extra > self._want:
            self._fail(ConnectionError("server sent more bytes than the range it announced"))
            return
        self._dest[:extra] = self._head_view[head_end : self._head_len]
        self._pos = extra
        self._head_len = 0
        self._in_body = True
        if self._pos >= self._want:
            self._finish()

    def _check_range(self, headers: dict[str, str]) -> Exception | None:
        want_end = self._expect_start + self._want - 1
        value = headers.get("content-range", "")
        m = _CONTENT_RANGE.fullmatch(value)
        if m is None or int(m.group(1)) != self._expect_start or int(m.group(2)) != want_end:
            return RangeMismatch(
                f"the store answered the range GET for bytes {self._expect_start}-{want_end} "
                f"with Content-Range {value!r}"
            )
        if headers.get("content-length") not in (None, str(self._want)):
            return RangeMismatch(
                f"the store answered the range GET for bytes {self._expect_start}-{want_end} "
                f"with Content-Length {headers['content-length']} instead of {self._want}"
            )
        return None

    def _collect_error_body(self) -> None:
        response = self._response
        assert response is not None
        length = response.headers.get("content-length")
        data = self._head[: self._head_len]
        done = (
            (length is not None and len(data) >= int(length))
            or (length is None and data.endswith(b"0\r\n\r\n"))
            or self._head_len >= _HEAD_MAX
        )
        if done:
            # Bodies we did not read to their end leave the connection unusable.
            if length is None or len(data) != int(length):
                response.headers["connection"] = "close"
            response.body = bytearray(data)
            self._head_len = 0
            self._finish()

    def _check_idle(self) -> None:
        """Fail the request once the store has sent nothing for ``idle_timeout`` seconds.

        An inactivity timeout, not a deadline: a large range on a slow but live link goes
        on, a stalled one fails fast (and the fetch scheduler retries it).
        """
        idle = time.monotonic() - self._last_io
        if idle >= self._idle_timeout:
            self._fail(TimeoutError(f"no data from the store for {idle:.1f} s"))
        else:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_timeout - idle, self._check_idle)

    async def request(
        self, head: bytes, dest: memoryview, start: int, idle_timeout: float
    ) -> _Response:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._last_io = time.monotonic()
        self._idle_timeout = idle_timeout
        self._idle_timer = loop.call_later(idle_timeout, self._check_idle)
        self._dest, self._pos, self._want = dest, 0, len(dest)
        self._expect_start = start
        self._in_body = False
        self._response = None
        self._head_len = 0
        try:
            try:
                self.transport.write(head)
            except RuntimeError as exc:  # uvloop: the transport closed under us
                raise ConnectionResetError(str(exc)) from None
            return await self._waiter
        finally:
            self._waiter = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None


class RangeMismatch(ConnectionError):
    """The store answered with a different range than asked for."""


class HttpPool:
    """Keep-alive connections per (scheme, host, port), at most ``limit`` open per host."""

    def __init__(self, *, limit: int, connect_timeout: float, read_timeout: float) -> None:
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Conn]] = defaultdict(list)
        self._slots: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._ssl: ssl.SSLContext | None = None
        self.open_connections = 0

    async def _connect(self, scheme: str, host: str, port: int) -> _Conn:
        loop = asyncio.get_running_loop()
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                _Conn, host, port, ssl=self._ssl if scheme == "https" else None
            )
        self.open_connections += 1
        return conn

    @property
    def busy_connections(self) -> int:
        return self.open_connections - sum(len(v) for v in self._idle.values())

    def _discard(self, conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.abort()
            conn.transport = None
            self.open_connections -= 1

    async def get_into(
        self, url: str, headers: dict[str, str], dest: memoryview, start: int
    ) -> None:
        """GET ``url`` with ``Range`` for len(dest) bytes from ``start`` into ``dest``.

        Raises HttpError for a non-206 answer, RangeMismatch for a wrong range, and
        ConnectionError/TimeoutError for transport failures.
        """
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}"]
        lines.append(f"Range: bytes={start}-{start + len(dest) - 1}")
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        slots = self._slots.setdefault(key, asyncio.Semaphore(self._limit))
        async with slots:
            idle = self._idle[key]
            while idle and idle[-1].closed:  # the store closed it while it sat idle
                self._discard(idle.pop())
            conn = idle.pop() if idle else await self._connect(*key)
            reusable = False
            try:
                response = await conn.request(head, dest, start, self._read_timeout)
                reusable = response.headers.get("connection", "").lower() != "close"
            finally:
                if reusable and not conn.closed:
                    idle.append(conn)
                else:
                    self._discard(conn)
        if response.status != 206:
            raise HttpError(response.status, response.headers, bytes(response.body))

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                self._discard(conn)
        self._idle.clear()


def transport_error(what: str, exc: BaseException) -> StoreUnavailable:
    """A message for a failed transfer that says what to check."""
    if isinstance(exc, RangeMismatch):
        return StoreUnavailable(f"{what}: {exc}; refusing the response")
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"{what}: timed out ({exc or 'no answer'})")
    return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")
