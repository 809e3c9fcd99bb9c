"""The lean data path's pool (``_http.HttpPool``) against servers on loopback: a CONNECT
refusal that arrives in one piece with its error page, CONNECT targets with IPv6 literals,
and idle connections the store closed (#25)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tensorferry.daemon.store._http import HttpPool
from tensorferry.daemon.store.proxy import ProxyChooser, ProxyFailed
from tensorferry.devtools.pki import make_pki
from tensorferry.devtools.proxy import CountingProxy
from tensorferry.devtools.s3server import make_client
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import FailedPrecondition, SourceChanged
from tests.conftest import BUCKET

PAGE = b"<html><body><h1>403 Forbidden</h1>tunnels are not allowed here</body></html>\n"


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A loopback server for ``handler``; its port. Every connection is closed and its
    handler done when the block ends (a dangling writer warns, and warnings fail)."""
    handlers: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers[writer] = asyncio.current_task()  # type: ignore[assignment]
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in handlers:
            writer.close()
        await asyncio.gather(*handlers.values(), return_exceptions=True)
        for writer in handlers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


def refusing_proxy(seen: list[bytes]) -> contextlib.AbstractAsyncContextManager[int]:
    """A forward proxy that refuses every request with an error page, head and page in one
    write (so they arrive in one read), keeping the connection open as keep-alive allows."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(PAGE), PAGE)
        )
        await writer.drain()
        await reader.read()  # until the client goes

    return serving(refuse)


def _pool(proxy_port: int | None, *, fallback: bool, ca: Path | None = None) -> HttpPool:
    proxies = ProxyChooser(f"http://127.0.0.1:{proxy_port}", {}) if proxy_port else None
    return HttpPool(
        limit=4, connect_timeout=10, read_timeout=10, proxies=proxies, fallback=fallback,
        ca_bundle=ca,
    )  # fmt: skip


async def test_a_connect_refusal_in_one_read_with_its_page_falls_back_to_the_store(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    data = os.urandom(300_000)
    s3.client().put_object(Bucket=BUCKET, Key=prefix + "blob", Body=data)
    make_pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "server.pem", tmp_path / "server_key.pem")
    seen: list[bytes] = []
    with CountingProxy(s3.endpoint, tls=tls) as store:
        signer = make_client(dataclasses.replace(s3, endpoint=store.endpoint))
        url = signer.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": prefix + "blob"}
        )
        async with refusing_proxy(seen) as port:
            pool = _pool(port, fallback=True, ca=tmp_path / "ca.pem")
            try:
                dest = bytearray(200_000)
                await pool.get_into(url, {}, memoryview(dest), 1000)
            finally:
                await pool.aclose()
    assert dest == data[1000:201_000]
    assert pool.fallbacks == 1
    authority = store.endpoint.removeprefix("https://")
    assert seen == [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()]


async def test_connect_targets_with_ipv6_literals_are_bracketed() -> None:
    seen: list[bytes] = []
    async with refusing_proxy(seen) as port:
        pool = _pool(port, fallback=False)
        try:
            with pytest.raises(ProxyFailed) as info:
                await pool.get_into("https://[::1]:9443/b/k", {}, memoryview(bytearray(8)), 0)
        finally:
            await pool.aclose()
    assert str(info.value) == (
        f"the proxy http://127.0.0.1:{port} refused a tunnel to [::1]:9443: HTTP 403"
    )
    assert seen == [b"CONNECT [::1]:9443 HTTP/1.1\r\nHost: [::1]:9443\r\n\r\n"]


class RangeServer:
    """Answers every range GET with 206 and bytes ``i % 251``; keeps connections alive
    until ``close_from`` closes those from the given client ports."""

    def __init__(self) -> None:
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self.held = asyncio.Event()  # answers wait for it: requests overlap
        self.waiting = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers[writer.get_extra_info("peername")[1]] = writer
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            line = next(ln for ln in head.split("\r\n") if ln.startswith("Range: "))
            first, last = map(int, line.removeprefix("Range: bytes=").split("-"))
            self.waiting += 1
            await self.held.wait()
            body = bytes(i % 251 for i in range(first, last + 1))
            writer.write(
                b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                b"Content-Range: bytes %d-%d/100000\r\n\r\n%b" % (len(body), first, last, body)
            )
            await writer.drain()

    def close_from(self, ports: set[int]) -> None:
        for port in ports:
            self.writers[port].close()


async def _until(check: Callable[[], bool], what: str) -> None:
    """Wait for ``check`` (state of the protocol objects, which have no event to wait on)."""
    try:
        async with asyncio.timeout(10):
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not reached within 10 s: {what}") from None


async def test_every_idle_connection_the_store_closed_is_reaped() -> None:
    ranges = RangeServer()
    async with serving(ranges.serve) as port:
        url = f"http://127.0.0.1:{port}/b/k"
        pool = _pool(None, fallback=True)
        try:
            dests = [bytearray(100) for _ in range(3)]
            async with asyncio.TaskGroup() as tg:
                for i, dest in enumerate(dests):
                    tg.create_task(pool.get_into(url, {}, memoryview(dest), 100 * i))
                await _until(lambda: ranges.waiting == 3, "three requests at once")
                ranges.held.set()
            assert dests[2] == bytes(i % 251 for i in range(200, 300))
            assert (pool.open_connections, pool.busy_connections) == (3, 0)
            # The store closes two of the three idle connections: not the last one returned.
            [idle] = pool._idle.values()
            ports = {c.transport.get_extra_info("sockname")[1] for c in idle[:2] if c.transport}
            ranges.close_from(ports)
            await _until(lambda: all(conn.closed for conn in idle[:2]), "the closes seen")
            dest = bytearray(50)
            await pool.get_into(url, {}, memoryview(dest), 7)
            assert dest == bytes(i % 251 for i in range(7, 57))
            assert pool.open_connections == 1
        finally:
            await pool.aclose()


async def test_without_fallback_a_proxy_that_re_chunks_ranges_fails_saying_what_to_do() -> None:
    async def rechunk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n"
        )
        await reader.read()

    async with serving(rechunk) as port:
        pool = _pool(port, fallback=False)
        dest = bytearray(10)
        try:
            with pytest.raises(FailedPrecondition) as info:
                await pool.get_into("http://store.internal:8333/b/k", {}, memoryview(dest), 0)
        finally:
            await pool.aclose()
    assert str(info.value) == (
        f"the proxy http://127.0.0.1:{port} answered bytes 0-9 of /b/k with Transfer-Encoding: "
        "chunked; tensorferry takes a range only as the object's own bytes, Content-Length "
        "long or ending with the connection: have the proxy pass range answers through "
        "unchanged, or turn [s3] proxy_fallback on to ask the store directly"
    )
    assert dest == bytearray(10)  # nothing landed


async def test_without_fallback_a_proxy_serving_another_version_is_named() -> None:
    async def stale(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b'HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100\r\nETag: "old"\r\n'
            b"Content-Length: 10\r\n\r\n0123456789"
        )
        await reader.read()

    async with serving(stale) as port:
        pool = _pool(port, fallback=False)
        dest = bytearray(10)
        try:
            with pytest.raises(SourceChanged) as info:
                await pool.get_into(
                    "http://store.internal:8333/b/k", {"If-Match": '"new"'}, memoryview(dest), 0
                )
        finally:
            await pool.aclose()
    assert str(info.value) == (
        f'the proxy http://127.0.0.1:{port} answered bytes 0-9 of /b/k with ETag "old", not '
        'the planned "new": it serves another version of the object than the store lists (a '
        "stale cache); purge it, or turn [s3] proxy_fallback on to ask the store directly"
    )
    assert dest == bytearray(10)  # nothing landed
