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
import ssl
import threading
from types import TracebackType
from urllib.parse import urlsplit

from tensorferry.devtools._relay import Connection
from tensorferry.devtools._wire import BUFFER
from tensorferry.devtools.faults import Fault, FaultHook, Kind, Ledger, RequestInfo, Stats

# Tests import these from here; they live in faults.py so the relay can share them.
__all__ = ["CountingProxy", "Fault", "FaultHook", "Kind", "RequestInfo", "Stats"]


class CountingProxy:
    """Counts and logs every request by Kind; ``reset()`` also restarts request numbers at 1.
    Hooks run on the proxy's loop thread; one that raises fails ``__exit__``."""

    def __init__(
        self, upstream: str, *, fault: FaultHook | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        #: Serve https (to the client; upstream stays http): an https store for the tests.
        self._tls = tls
        self._ledger = Ledger(fault)
        self._errors: list[BaseException] = []
        self._conns: dict[Connection, asyncio.Task[None]] = {}
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
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def stats(self) -> Stats:
        return self._ledger.snapshot()

    def reset(self) -> None:
        """Zero the counters and the log; request numbers start again from 1."""
        self._ledger.reset()

    def set_fault(self, hook: FaultHook | None) -> None:
        self._ledger.set_hook(hook)

    def _first_error(self) -> BaseException | None:
        return self._errors[0] if self._errors else None

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
        server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, limit=BUFFER, ssl=self._tls
        )
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
        writer.transport.set_write_buffer_limits(high=BUFFER)
        conn = Connection(self._ledger, self._upstream, self._errors, reader, writer)
        self._conns[conn] = asyncio.get_running_loop().create_task(self._serve(conn))
        self._ledger.count_connection(+1)

    async def _serve(self, conn: Connection) -> None:
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
