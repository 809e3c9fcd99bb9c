"""New connections of the lean data path (``_http``): to the store, or through a forward
proxy (a CONNECT tunnel for https), with TLS run by our own protocol (``_http_tls``).

uvloop's SSL transport stays selectable (``uvloop_tls``) only so that bench/bench_tls.py can
measure both; it is no setting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

from tensorferry.daemon.store._http_conn import Connection
from tensorferry.daemon.store._http_tls import CIPHER_BUFFER, TlsConnection, certificate_refused
from tensorferry.daemon.store.proxy import Proxy, ProxyFailed
from tensorferry.errors import FailedPrecondition


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Where a request's connection goes: the store itself, or the store's host through
    ``proxy`` (absolute URIs for http, a CONNECT tunnel for https)."""

    scheme: str
    host: str
    port: int
    proxy: Proxy | None = None


class Connector:
    """Opens a pool's connections. It belongs to one event loop, as the TLS connections
    share its ciphertext buffer: each read is consumed in the callback that received it."""

    def __init__(self, *, timeout: float, ca_bundle: Path | None, uvloop_tls: bool = False) -> None:
        self._timeout = timeout
        self._ca_bundle = ca_bundle
        self._uvloop_tls = uvloop_tls
        self._ssl: ssl.SSLContext | None = None
        self._cipher: memoryview | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            cafile = str(self._ca_bundle) if self._ca_bundle is not None else None
            self._ssl = ssl.create_default_context(cafile=cafile)
        return self._ssl

    def _protocol(self) -> Connection:
        if self._uvloop_tls:
            return Connection()
        if self._cipher is None:
            self._cipher = memoryview(bytearray(CIPHER_BUFFER))
        return TlsConnection(self._cipher)

    async def connect(self, route: Route) -> Connection:
        """A connection ready for requests; FailedPrecondition for a certificate that
        does not verify, ProxyFailed for a proxy that cannot be reached or refuses."""
        loop = asyncio.get_running_loop()
        https = route.scheme == "https"
        factory = self._protocol if https else Connection
        proxy = route.proxy
        if proxy is None:
            old = self._context() if https and self._uvloop_tls else None
            try:
                async with asyncio.timeout(self._timeout):
                    _, conn = await loop.create_connection(factory, route.host, route.port, ssl=old)
            except ssl.SSLCertVerificationError as exc:
                raise self._refused(route, exc) from exc
            if isinstance(conn, TlsConnection):
                await self._start_tls(conn, route)
            return conn
        try:
            async with asyncio.timeout(self._timeout):
                _, conn = await loop.create_connection(factory, proxy.host, proxy.port)
        except (OSError, TimeoutError) as exc:
            raise ProxyFailed(f"cannot connect to the proxy {proxy.shown}: {exc}") from exc
        return await self._tunnel(conn, route, proxy) if https else conn

    def _refused(self, route: Route, exc: ssl.SSLCertVerificationError) -> FailedPrecondition:
        detail = exc.verify_message or str(exc)
        return certificate_refused(f"https://{route.host}:{route.port}", detail, self._ca_bundle)

    async def _start_tls(self, conn: TlsConnection, route: Route) -> None:
        try:
            await conn.start_tls(self._context(), route.host, self._timeout)
        except ssl.SSLCertVerificationError as exc:
            _abort(conn)
            raise self._refused(route, exc) from exc
        except BaseException:
            _abort(conn)
            raise

    async def _tunnel(self, conn: Connection, route: Route, proxy: Proxy) -> Connection:
        """CONNECT through ``proxy``, then TLS with the store inside the tunnel."""
        host = f"[{route.host}]" if ":" in route.host else route.host  # an IPv6 literal
        authority = f"{host}:{route.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            answer = await conn.tunnel(head, self._timeout)
            if not 200 <= answer.status < 300:
                raise ProxyFailed(
                    f"the proxy {proxy.shown} refused a tunnel to {authority}: HTTP {answer.status}"
                )
            if isinstance(conn, TlsConnection):
                await self._start_tls(conn, route)
                return conn
            assert conn.transport is not None
            async with asyncio.timeout(self._timeout):
                conn.transport = await asyncio.get_running_loop().start_tls(
                    conn.transport, conn, self._context(), server_hostname=route.host
                )
            conn.encrypted()
        except ssl.SSLCertVerificationError as exc:
            _abort(conn)
            raise self._refused(route, exc) from exc
        except BaseException:
            _abort(conn)
            raise
        return conn


def _abort(conn: Connection) -> None:
    if conn.transport is not None:
        conn.transport.abort()
