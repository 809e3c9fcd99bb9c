"""The lean data path: HTTP/1.1 range GETs whose bodies land straight in their destination.

aiobotocore costs 2-3x the CPU per byte of this path (see docs/performance.md): its body
is read into fresh bytes objects and copied again. Here an ``asyncio.BufferedProtocol``
(``_http_conn``) hands the kernel a slice of the destination (the arena on CPU hosts, a
ring slot on GPU hosts), so each byte is written once. Signing stays with botocore
(presigned URLs). This module keeps those connections alive per host and says how a
request failed.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections import defaultdict

from tensorferry.daemon.store._http_conn import Connection, RangeMismatch
from tensorferry.errors import StoreUnavailable


class HttpError(Exception):
    """A non-206 answer; ``status`` and the S3 error body let the caller map it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


class HttpPool:
    """Keep-alive connections per (scheme, host, port), at most ``limit`` open per host."""

    def __init__(self, *, limit: int, connect_timeout: float, read_timeout: float) -> None:
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[Connection]] = defaultdict(list)
        self._slots: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._ssl: ssl.SSLContext | None = None
        self.open_connections = 0

    async def _connect(self, scheme: str, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                Connection, host, port, ssl=self._ssl if scheme == "https" else None
            )
        self.open_connections += 1
        return conn

    @property
    def busy_connections(self) -> int:
        return self.open_connections - sum(len(v) for v in self._idle.values())

    def _discard(self, conn: Connection) -> None:
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
