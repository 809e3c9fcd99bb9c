"""A counting, fault-injecting HTTP/1.1 reverse proxy for tests in front of a real S3 server.

Clients sign requests for the proxy's host:port, so heads and bodies travel unchanged (Host
included) and SigV4 still verifies upstream. Each downstream connection gets its own upstream
connection; keep-alive, ``Content-Length`` and chunked bodies, HEAD and ``100-continue`` are
passed through byte for byte. The proxy runs its own event loop in a daemon thread so a test
thread can block in synchronous calls (boto3, the daemon's client) while it keeps serving.

    with CountingProxy(server.endpoint, fault=hook) as proxy:
        client = make_client(proxy.endpoint); ...
        assert proxy.stats().requests[Kind.DATA_GET] == 4
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import responses
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

_READ = 1 << 20
# Large reader and writer buffers let one read() move a big slice, which is what keeps the
# per-chunk Python overhead small enough for ~1 GB/s on loopback.
_BUFFER = 4 << 20
_HEADER_GET_LIMIT = 1 << 20
_CHUNKED, _UNTIL_EOF = -1, -2
_EARLY_BODY_GRACE_S = 2.0
_HEADER_RANGE = re.compile(r"bytes=0-(\d+)$")


class Kind(str, enum.Enum):  # noqa: UP042 - StrEnum would change str(Kind.X) in test output
    HEAD = "head"
    HEADER_GET = "header_get"
    DATA_GET = "data_get"
    LIST = "list"
    OBJECT_GET = "object_get"
    OTHER = "other"


@dataclass(frozen=True)
class RequestInfo:
    number: int
    kind: Kind
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Fault:
    """What to do to one response. ``status`` answers from the proxy (only ``stall`` also
    applies); ``reset_after`` resets even when the body is shorter, right after it; offsets
    count payload bytes, so chunk framing is never touched."""

    content_range: str | None = None
    status: int | None = None
    s3_code: str = "SlowDown"
    reset_after: int | None = None
    flip_byte_at: int | None = None
    stall: float | None = None
    #: Forward this many body bytes, then close the connection cleanly (a short body with
    #: the original Content-Length), or keep it open and silent when ``hang`` is set.
    truncate_after: int | None = None
    hang: bool = False
    #: Sleep this long before forwarding each body read of up to 64 KiB (a slow link).
    trickle: float | None = None
    #: Forward the request without its Range header: the server answers 200, whole object.
    drop_range: bool = False


FaultHook = Callable[[RequestInfo], Fault | None]


@dataclass
class Stats:
    """``faults_fired`` counts requests the hook returned a Fault for; ``open_connections``
    counts downstream connections, which close a moment after the client drops them."""

    requests: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    body_bytes: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    open_connections: int = 0
    faults_fired: int = 0
    log: list[RequestInfo] = field(default_factory=list)


class _BadMessage(ValueError):
    pass


class _Reset(Exception):
    pass


class _Truncate(Exception):
    pass


# Failures a client or server may cause at any moment; they end one connection quietly.
_QUIET = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _BadMessage)


def _classify(method: str, target: str, headers: dict[str, str]) -> Kind:
    if method == "HEAD":
        return Kind.HEAD
    if method != "GET":
        return Kind.OTHER
    path, _, query = target.partition("?")
    if "list-type" in query or "/" not in path.strip("/"):
        return Kind.LIST
    rng = headers.get("range")
    if rng is None:
        return Kind.OBJECT_GET
    m = _HEADER_RANGE.match(rng.strip())
    return Kind.HEADER_GET if m and int(m[1]) < _HEADER_GET_LIMIT else Kind.DATA_GET


class _Head:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.decode("latin-1").split("\r\n")
        self.start = lines[0].split(" ", 2)
        if len(self.start) < 2:
            raise _BadMessage(lines[0])
        self.lines = [line for line in lines[1:] if line]
        self.headers: dict[str, str] = {}
        for line in self.lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadMessage(line)
            key, value = name.strip().lower(), value.strip()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value

    def token(self, name: str, value: str) -> bool:
        return value in self.headers.get(name, "").lower()

    def framing(self, *, no_body: bool, until_eof: bool) -> int:
        if no_body:
            return 0
        if self.token("transfer-encoding", "chunked"):
            return _CHUNKED
        if "content-length" in self.headers:
            return int(self.headers["content-length"])
        return _UNTIL_EOF if until_eof else 0

    def without(self, name: str) -> bytes:
        kept = [ln for ln in self.lines if ln.partition(":")[0].strip().lower() != name]
        return "\r\n".join([" ".join(self.start), *kept, "", ""]).encode("latin-1")

    def rebuilt(self, replace: dict[str, str]) -> bytes:
        names = {name.lower() for name in replace}
        kept = [ln for ln in self.lines if ln.partition(":")[0].strip().lower() not in names]
        extra = [f"{name}: {value}" for name, value in replace.items()]
        return "\r\n".join([" ".join(self.start), *kept, *extra, "", ""]).encode("latin-1")


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


class _Discard:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


class _Tap:
    """Counts response body bytes and applies the byte-level faults by offset within the body."""

    def __init__(self, proxy: CountingProxy, kind: Kind, fault: Fault | None) -> None:
        self.proxy, self.kind, self.fault, self.offset = proxy, kind, fault, 0

    def take(self, chunk: bytes) -> tuple[bytes, bool]:
        start, reset = self.offset, False
        if self.fault is not None:
            stop = self.fault.reset_after
            if stop is not None and start + len(chunk) >= stop:
                chunk, reset = chunk[: max(stop - start, 0)], True
            cut = self.fault.truncate_after
            if cut is not None and start + len(chunk) >= cut:
                chunk = chunk[: max(cut - start, 0)]
                self.offset += len(chunk)
                self.proxy._count_body(self.kind, len(chunk))
                raise _Truncate(chunk)
            flip = self.fault.flip_byte_at
            if flip is not None and start <= flip < start + len(chunk):
                buf = bytearray(chunk)
                buf[flip - start] ^= 0xFF
                chunk = bytes(buf)
        self.offset += len(chunk)
        self.proxy._count_body(self.kind, len(chunk))
        return chunk, reset


async def _pipe(src: asyncio.StreamReader, dst: _Sink, n: int, tap: _Tap | None) -> None:
    trickle = tap.fault.trickle if tap is not None and tap.fault is not None else None
    size = _READ if trickle is None else 64 << 10
    while n != 0:
        if trickle is not None:
            await asyncio.sleep(trickle)
        chunk = await src.read(size if n < 0 else min(n, size))
        if not chunk:
            if n < 0:
                return
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(chunk) if n > 0 else 0
        reset = False
        if tap is not None:
            try:
                chunk, reset = tap.take(chunk)
            except _Truncate as cut:
                dst.write(cut.args[0])
                await dst.drain()
                raise
        dst.write(chunk)
        await dst.drain()
        if reset:
            raise _Reset


async def _forward(src: asyncio.StreamReader, dst: _Sink, framing: int, tap: _Tap | None) -> None:
    if framing != _CHUNKED:
        await _pipe(src, dst, framing, tap)
    else:
        # Chunk framing is forwarded verbatim; only the payload goes through the tap.
        while True:
            line = await src.readuntil(b"\r\n")
            dst.write(line)
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError as exc:
                raise _BadMessage(line) from exc
            if size == 0:
                break
            await _pipe(src, dst, size, tap)
            dst.write(await src.readexactly(2))
        while line != b"\r\n":
            line = await src.readuntil(b"\r\n")
            dst.write(line)
        await dst.drain()
    if tap is not None and tap.fault is not None and tap.fault.reset_after is not None:
        raise _Reset  # the body was shorter than reset_after: reset anyway, after it


class _Conn:
    """One downstream connection and the upstream connection that serves it."""

    def __init__(self, proxy: CountingProxy, r: asyncio.StreamReader, w: asyncio.StreamWriter):
        self.proxy, self.down_r, self.down_w = proxy, r, w
        self.up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.hang_fault = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.down_w] if self.up is None else [self.down_w, self.up[1]]

    async def serve(self) -> None:
        try:
            while await self.exchange(await self.down_r.readuntil(b"\r\n\r\n")):
                pass
        except _Reset:
            transport = self.down_w.transport
            transport.set_write_buffer_limits(high=0)  # drain() now waits for an empty buffer
            with contextlib.suppress(*_QUIET):
                await self.down_w.drain()
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        except _Truncate:
            if self.hang_fault:
                # Headers promised more; the client must notice the silence (read timeout).
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)
        except _QUIET:
            pass
        except RuntimeError as exc:
            # uvloop raises RuntimeError (not OSError) when writing to a transport the
            # client already aborted, e.g. after its read timeout during a stall.
            if "closed" not in str(exc):
                self.proxy._errors.append(exc)
        except Exception as exc:  # a proxy bug or a failing hook: surfaced from __exit__
            self.proxy._errors.append(exc)
        finally:
            self.proxy._count_connection(-1)
            for writer in self.writers():
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.up is not None and (self.up[0].at_eof() or self.up[1].is_closing()):
            await self.drop_upstream()
        if self.up is None:
            host, port = self.proxy._upstream
            self.up = await asyncio.open_connection(host, port, limit=_BUFFER)
            self.up[1].transport.set_write_buffer_limits(high=_BUFFER)
        return self.up

    async def drop_upstream(self) -> None:
        if self.up is not None:
            writer, self.up = self.up[1], None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def exchange(self, raw: bytes) -> bool:
        """Serve one request; True when the downstream connection stays open."""
        req = _Head(raw)
        method, target = req.start[0], req.start[1]
        kind = _classify(method, target, req.headers)
        info, fault = self.proxy._admit(kind, method, target, req.headers)
        req_framing = req.framing(no_body=False, until_eof=False)
        expect = req.token("expect", "100-continue")
        close = req.token("connection", "close") or req.start[-1] == "HTTP/1.0"
        if fault is not None and fault.status is not None:
            return await self.answer(info, fault, req_framing, expect, close)

        up_r, up_w = await self.upstream()
        if fault is not None and fault.drop_range:
            raw = req.without("range")
        self.hang_fault = fault is not None and fault.hang
        up_w.write(raw)
        sent = asyncio.Event()  # the whole request body is in upstream's transport
        body = None
        if req_framing != 0:
            body = asyncio.create_task(self.send_body(up_w, req_framing, sent))
        else:
            sent.set()
        drop = continued = False
        try:
            while True:
                resp = _Head(await up_r.readuntil(b"\r\n\r\n"))
                status = int(resp.start[1])
                if status >= 200:
                    break
                self.down_w.write(resp.raw)  # 100 Continue and friends pass through
                await self.down_w.drain()
                continued = True
            drop = resp.token("connection", "close")
            if not sent.is_set():
                # Upstream answered before the body was through (an early error). A client that
                # waited on 100-continue never sends it; one mid-upload may still be sending:
                # either way this connection's stream position is unknown, so close it after.
                close = drop = True
                if body is not None and expect and not continued:
                    body.cancel()
            framing = resp.framing(no_body=method == "HEAD" or status in (204, 304), until_eof=True)
            if framing == _UNTIL_EOF:
                close = drop = True
            replace = {}
            if fault is not None and fault.content_range is not None:
                replace["Content-Range"] = fault.content_range
            if close and not resp.token("connection", "close"):
                replace["Connection"] = "close"
            if fault is not None and fault.stall is not None:
                await asyncio.sleep(fault.stall)
            self.down_w.write(resp.rebuilt(replace) if replace else resp.raw)
            try:
                await _forward(up_r, self.down_w, framing, _Tap(self.proxy, kind, fault))
            except (_Reset, _Truncate):
                drop = True  # the upstream body was not read to its end
                raise
        finally:
            if body is not None:
                if not body.done():
                    await asyncio.wait([body], timeout=_EARLY_BODY_GRACE_S)
                    body.cancel()
                    await asyncio.wait([body])
                if not body.cancelled():
                    body.exception()  # its failure shows on the response side; mark it seen
            if drop:
                await self.drop_upstream()
        return not close

    async def send_body(
        self, up_w: asyncio.StreamWriter, framing: int, sent: asyncio.Event
    ) -> None:
        await _forward(self.down_r, up_w, framing, None)
        sent.set()

    async def answer(
        self, info: RequestInfo, fault: Fault, framing: int, expect: bool, close: bool
    ) -> bool:
        if framing != 0:
            if expect:
                close = True  # the client waits for 100 before its body; it never gets one
            else:
                await _forward(self.down_r, _Discard(), framing, None)
        status = fault.status or 503
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{fault.s3_code}</Code><Message>injected by CountingProxy</Message>"
            f"<Resource>{info.path.partition('?')[0]}</Resource>"
            f"<RequestId>proxy-{info.number}</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {responses.get(status, 'Injected')}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: proxy-{info.number}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode()
        if info.method == "HEAD":
            body = b""
        if fault.stall is not None:
            await asyncio.sleep(fault.stall)
        self.proxy._count_body(info.kind, len(body))
        self.down_w.write(head + body)
        await self.down_w.drain()
        return not close


class CountingProxy:
    """Counts and logs every request by Kind; ``reset()`` also restarts request numbers at 1.
    Hooks run on the proxy's loop thread; one that raises fails ``__exit__``."""

    def __init__(self, upstream: str, *, fault: FaultHook | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self._hook = fault
        self._lock = threading.Lock()
        self._stats = Stats()
        self._number = 0
        self._errors: list[BaseException] = []
        self._conns: dict[_Conn, asyncio.Task[None]] = {}
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    def __enter__(self) -> CountingProxy:
        if self._thread is not None:
            raise RuntimeError("a CountingProxy can be started only once")
        self._thread = threading.Thread(target=self._run, name="CountingProxy", daemon=True)
        self._thread.start()
        self._ready.wait()
        if not self.port:
            self._thread.join()
            raise RuntimeError("CountingProxy failed to start") from self._first_error()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join()
        error = self._first_error()
        if error is not None and exc_type is None:
            # A broken hook or a proxy bug must fail the test, not pass for a network fault.
            raise RuntimeError("CountingProxy failed while serving") from error

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(
                dict(s.requests),
                dict(s.body_bytes),
                s.open_connections,
                s.faults_fired,
                list(s.log),
            )

    def reset(self) -> None:
        """Zero the counters and the log; request numbers start again from 1."""
        with self._lock:
            self._stats = Stats(open_connections=self._stats.open_connections)
            self._number = 0

    def set_fault(self, hook: FaultHook | None) -> None:
        with self._lock:
            self._hook = hook

    def _first_error(self) -> BaseException | None:
        return self._errors[0] if self._errors else None

    def _admit(
        self, kind: Kind, method: str, target: str, headers: dict[str, str]
    ) -> tuple[RequestInfo, Fault | None]:
        with self._lock:
            self._number += 1
            info = RequestInfo(self._number, kind, method, target, headers)
            self._stats.requests[kind] += 1
            self._stats.log.append(info)
            hook = self._hook
        # Outside the lock: a hook may call stats() or set_fault().
        fault = hook(info) if hook is not None else None
        if fault is not None:
            with self._lock:
                self._stats.faults_fired += 1
        return info, fault

    def _count_body(self, kind: Kind, n: int) -> None:
        with self._lock:
            self._stats.body_bytes[kind] += n

    def _count_connection(self, delta: int) -> None:
        with self._lock:
            self._stats.open_connections += delta

    def _run(self) -> None:
        self._loop = _new_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:
            self._errors.append(exc)
        finally:
            self._ready.set()
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_BUFFER)
        try:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            server.close()
            for conn, task in list(self._conns.items()):
                for writer in conn.writers():
                    writer.transport.abort()
                task.cancel()
            await asyncio.gather(*self._conns.values(), return_exceptions=True)
            await server.wait_closed()
            await asyncio.get_running_loop().shutdown_default_executor()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so the connection task is ours: start_server would log the
        # CancelledError of every connection task that shutdown cancels.
        writer.transport.set_write_buffer_limits(high=_BUFFER)
        conn = _Conn(self, reader, writer)
        self._conns[conn] = asyncio.get_running_loop().create_task(self._serve(conn))
        self._count_connection(+1)

    async def _serve(self, conn: _Conn) -> None:
        try:
            await conn.serve()
        finally:
            del self._conns[conn]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
