"""The lean data path: HTTP/1.1 range GETs whose bodies land straight in their destination.

aiobotocore costs 2-3x the CPU per byte of this path (see docs/performance.md): its body
is read into fresh bytes objects and copied again. Here an ``asyncio.BufferedProtocol``
(``_http_conn``) hands the kernel a slice of the destination (the arena on CPU hosts, a
ring slot on GPU hosts), so each byte is written once. Signing stays with botocore
(presigned URLs). This module keeps those connections alive per route (the store, or a
forward proxy: see ``proxy``), falls back to the store when a proxy fails a range, and
says how a request failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path

from tensorferry.daemon.store._http_conn import Connection
from tensorferry.daemon.store._http_connect import Connector
from tensorferry.daemon.store._http_connect import Route as _Route
from tensorferry.daemon.store._http_head import OtherVersion, RangeMismatch, Unusable
from tensorferry.daemon.store.base import StoreEvents
from tensorferry.daemon.store.proxy import Proxy, ProxyChooser, ProxyFailed, proxy_error
from tensorferry.errors import (
    FailedPrecondition,
    SourceChanged,
    StoreUnavailable,
    TensorferryError,
)

log = logging.getLogger(__name__)
_FALLBACK_LOG_EVERY = 10.0


class HttpError(Exception):
    """A non-206 answer; ``status`` and the S3 error body let the caller map it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


class OtherVersionAnswer(HttpError):
    """A 206 of another version than the planned one (by its ETag): what a store answers
    to a failed ``If-Match``, 412, so that it is mapped as one."""

    def __init__(self, detail: str) -> None:
        super().__init__(412, {}, b"")
        self.args = (f"HTTP 206 with {detail}",)


class HttpPool:
    """Keep-alive connections per route, at most ``limit`` open per route."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        proxies: ProxyChooser | None = None,
        fallback: bool = True,
        ca_bundle: Path | None = None,
        events: StoreEvents | None = None,
        _uvloop_tls: bool = False,
    ) -> None:
        self._limit = limit
        self._read_timeout = read_timeout
        self._proxies = proxies
        self._fallback = fallback
        self._idle: dict[_Route, list[Connection]] = defaultdict(list)
        self._slots: dict[_Route, asyncio.Semaphore] = {}
        self.open_connections = 0
        #: Ranges asked of the store directly after the proxy failed them.
        self.fallbacks = 0
        self._events = events or StoreEvents()
        self._fallback_logged = -_FALLBACK_LOG_EVERY
        # uvloop's SSL transport instead of ours: only for bench/bench_tls.py's comparison.
        self._connector = Connector(
            timeout=connect_timeout, ca_bundle=ca_bundle, uvloop_tls=_uvloop_tls
        )

    async def _connect(self, route: _Route) -> Connection:
        conn = await self._connector.connect(route)
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

        An ``If-Match`` header names the planned version: an answer with another ETag
        fails too (a cache on the path need not honour ``If-Match``).

        Raises HttpError for a non-206 answer or one of another version (as 412),
        FailedPrecondition for a body with a transfer or content coding, RangeMismatch for
        a wrong range, ConnectionError/TimeoutError for transport failures, and ProxyFailed
        when a proxy failed the request and there is no fallback.
        """
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        origin = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"Host: {parts.netloc.rpartition('@')[2]}"]
        lines.append(f"Range: bytes={start}-{start + len(dest) - 1}")
        # Without it a proxy or CDN may compress the answer (RFC 9110), which is then refused.
        lines.append("Accept-Encoding: identity")
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        etag = next((v for k, v in headers.items() if k.lower() == "if-match"), None)
        proxy = self._proxies.for_host(scheme, host, port) if self._proxies else None
        if proxy is not None:
            if scheme == "https":
                route, target, extra = _Route(scheme, host, port, proxy), origin, []
            else:
                # Absolute URIs to the proxy; its connections are still kept per store host,
                # as some proxies relay whatever follows the first request to its host.
                route, target = _Route("http", host, port, proxy), f"http://{parts.netloc}{origin}"
                auth = proxy.authorization
                extra = [f"Proxy-Authorization: {auth}"] if auth else []
            try:
                await self._get(route, target, [*lines, *extra], dest, start, etag)
                return
            except ProxyFailed as exc:
                if not self._fallback:
                    raise
                self._count_fallback(exc)
            except Unusable as exc:
                # The proxy's doing (a stale cache, a re-chunking proxy) until the store says
                # so; but in a tunnel the answer is the store's own: TLS keeps proxies out.
                by = proxy if scheme == "http" else None
                if by is None or not self._fallback:
                    raise _refusal(exc, parts, start, len(dest), by) from exc
                self._count_fallback(
                    ProxyFailed(f"the proxy {by.shown} answered a range with {exc}")
                )
        try:
            await self._get(_Route(scheme, host, port), origin, lines, dest, start, etag)
        except Unusable as exc:
            raise _refusal(exc, parts, start, len(dest), None) from exc

    def _count_fallback(self, exc: ProxyFailed) -> None:
        self.fallbacks += 1
        self._events.fell_back()
        now = time.monotonic()
        if now - self._fallback_logged >= _FALLBACK_LOG_EVERY:
            self._fallback_logged = now
            log.warning("%s; asking the store directly (%d so far)", exc, self.fallbacks)

    async def _get(
        self, route: _Route, target: str, lines: list[str], dest: memoryview, start: int,
        etag: str | None,
    ) -> None:  # fmt: skip
        head = "\r\n".join([f"GET {target} HTTP/1.1", *lines]) + "\r\n\r\n"
        slots = self._slots.setdefault(route, asyncio.Semaphore(self._limit))
        async with slots:
            idle = self._idle[route]
            if any(conn.closed for conn in idle):  # the store closed them while they sat
                for conn in idle:
                    if conn.closed:
                        self._discard(conn)
                idle[:] = [conn for conn in idle if not conn.closed]
            kept = bool(idle)
            conn = idle.pop() if kept else await self._connect(route)
            while True:
                reusable = False
                try:
                    response = await conn.request(
                        head.encode("latin-1"), dest, start, self._read_timeout, etag
                    )
                    reusable = "close" not in (
                        response.headers.get("connection", "").lower(),
                        response.headers.get("proxy-connection", "").lower(),
                    )
                    break
                except ConnectionError:
                    # A kept-alive connection the peer had closed unseen (proxies close
                    # after each answer without saying so): once more on a new one.
                    if not kept or conn.answered:
                        raise
                    kept = False
                finally:
                    if reusable and not conn.closed:
                        idle.append(conn)
                    else:
                        self._discard(conn)
                conn = await self._connect(route)
        if response.status == 206:
            return
        body = bytes(response.body)
        if route.proxy is not None:
            why = proxy_error(response.status, response.headers, body)
            if why is not None:
                raise ProxyFailed(f"the proxy {route.proxy.shown} answered {why}")
        raise HttpError(response.status, response.headers, body)

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                self._discard(conn)
        self._idle.clear()


def _refusal(
    exc: Unusable, url: urllib.parse.SplitResult, start: int, length: int, proxy: Proxy | None
) -> TensorferryError | HttpError:
    """The error for a 206 that must not land: never retried, as the same route gives the
    same answer again."""
    store = f"{url.scheme}://{url.netloc.rpartition('@')[2]}"
    who = f"the proxy {proxy.shown}" if proxy else f"the store at {store}"
    what = f"bytes {start}-{start + length - 1} of {url.path}"
    if isinstance(exc, OtherVersion):
        if proxy is None:
            return OtherVersionAnswer(str(exc))
        return SourceChanged(
            f"{who} answered {what} with {exc}: it serves another version of the object than "
            "the store lists (a stale cache); purge it, or turn [s3] proxy_fallback on to ask "
            "the store directly"
        )
    fix = (
        "have the proxy pass range answers through unchanged, or turn [s3] proxy_fallback "
        "on to ask the store directly"
        if proxy
        else "if a proxy or load balancer in front of the store re-encodes answers, have it "
        "pass range answers through unchanged"
    )
    return FailedPrecondition(
        f"{who} answered {what} with {exc}; tensorferry takes a range only as the object's "
        f"own bytes, Content-Length long or ending with the connection: {fix}"
    )


def transport_error(what: str, exc: BaseException) -> StoreUnavailable:
    """A message for a failed transfer that says what to check."""
    if isinstance(exc, RangeMismatch):
        return StoreUnavailable(f"{what}: {exc}; refusing the response")
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"{what}: timed out ({exc or 'no answer'})")
    return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")
