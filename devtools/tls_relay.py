"""A TLS terminator for tests: https on loopback, each connection relayed byte for byte to a
plain upstream (a CountingProxy in front of SeaweedFS, whose faults then reach the client
as TLS streams cut short).

When the upstream connection ends or fails, the client's TLS stream is dropped without
``close_notify``: a truncated TLS stream, as a crashed or cut-off front end leaves it.

    with CountingProxy(s3.endpoint, fault=hook) as faults, TlsRelay(faults.endpoint, ctx) as tls:
        ... tls.endpoint (https://127.0.0.1:PORT) ...
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType
from urllib.parse import urlsplit

_CHUNK = 256 << 10


class TlsRelay:
    def __init__(self, upstream: str, context: ssl.SSLContext) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="TlsRelay", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections whose upstream ended while the client was connected.
        self.cut = 0
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> TlsRelay:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = started.result(timeout=30)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._context)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so the task is ours to cancel at the end.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(reader, up_w, close=True))
                answers = tg.create_task(_pump(up_r, writer))
                await answers
                # The upstream ended: drop the client's stream without close_notify.
                if not reader.at_eof():
                    self.cut += 1
                writer.transport.abort()
                up_w.transport.abort()
        except* (OSError, ssl.SSLError):
            writer.transport.abort()
        finally:
            up_w.transport.abort()
            writer.transport.abort()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, close: bool = False
) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    if close:  # the client left: so does our upstream connection, which ends the answers
        writer.transport.abort()
