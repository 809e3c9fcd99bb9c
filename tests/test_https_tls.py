"""The lean data path's own TLS (``_http_tls.TlsConnection``), fed the bytes of an
in-process ``ssl`` server over memory BIOs: records cut anywhere, the kernel's wake-up mark
(SO_RCVLOWAT) never above the ciphertext still to come, and every way a TLS stream can end
early failing the request (#26)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tensorferry.daemon.store._http import HttpPool
from tensorferry.daemon.store._http_conn import Response
from tensorferry.daemon.store._http_tls import CIPHER_BUFFER, TlsConnection
from tensorferry.devtools.pki import make_pki
from tensorferry.devtools.tls_store import TlsStore
from tensorferry.errors import FailedPrecondition

START = 1000


class Peer:
    """The server's side: an SSLObject whose ciphertext the test hands to the client."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def pump(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()

    def send(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()


class FakeSocket:
    """Records each SO_RCVLOWAT with the ciphertext still to come at that moment."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, int]] = []
        self.to_come = 0

    def setsockopt(self, level: int, name: int, value: int) -> None:
        assert (level, name) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.marks.append((value, self.to_come))


class FakeTransport:
    def __init__(self, conn: TlsConnection, peer: Peer) -> None:
        self.conn, self.peer, self.aborted = conn, peer, False
        self.sock = FakeSocket()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def write(self, data: bytes) -> None:
        self.peer.incoming.write(data)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


def deliver(conn: TlsConnection, transport: FakeTransport, data: bytes, cut: int) -> None:
    """``data`` as the kernel may hand it over: reads of ``cut`` bytes at most."""
    transport.sock.to_come += len(data)
    while data and not transport.aborted:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data), cut)
        buf[:n] = data[:n]
        transport.sock.to_come -= n
        conn.buffer_updated(n)
        data = data[n:]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    directory = tmp_path_factory.mktemp("pki")
    make_pki(directory)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "server.pem", directory / "server_key.pem")
    return server, ssl.create_default_context(cafile=str(directory / "ca.pem"))


async def connected(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[TlsConnection, FakeTransport, Peer]:
    server, client = contexts
    peer = Peer(server)
    conn = TlsConnection(memoryview(bytearray(CIPHER_BUFFER)))
    transport = FakeTransport(conn, peer)
    conn.connection_made(transport)  # type: ignore[arg-type]
    shake = asyncio.create_task(conn.start_tls(client, "localhost", 5.0))
    while not shake.done():
        await asyncio.sleep(0)
        peer.pump()
        deliver(conn, transport, peer.outgoing.read(), 1 << 20)
    await shake
    return conn, transport, peer


def head(body: bytes, *, length: bool = True) -> bytes:
    end = START + len(body) - 1
    size = f"Content-Length: {len(body)}\r\n" if length else ""
    return (
        f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {START}-{end}/99999999\r\n{size}\r\n"
    ).encode()


async def outcome(task: asyncio.Task[Response]) -> Response | BaseException | None:
    for _ in range(3):  # a waiter's result reaches the task in a loop turn or two
        await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
        return None
    return task.exception() or task.result()


@pytest.mark.parametrize("cut", [1 << 20, 16_411, 7_001, 333])
async def test_a_body_of_many_records_lands_whole_and_the_kernel_never_waits_for_too_much(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], cut: int
) -> None:
    conn, transport, peer = await connected(contexts)
    body = os.urandom(3 << 20)
    dest = bytearray(len(body))
    task = asyncio.create_task(conn.request(b"GET", memoryview(dest), START, 5.0))
    await asyncio.sleep(0)
    assert peer.tls.read(100) == b"GET"
    deliver(conn, transport, peer.send(head(body) + body), cut)
    got = await outcome(task)
    assert isinstance(got, Response), got
    assert got.status == 206
    assert dest == body
    marks = transport.sock.marks
    assert max(value for value, _ in marks) > 1  # it did gather
    assert [(v, left) for v, left in marks if v > left] == []
    assert marks[-1][0] == 1  # for the next answer's head


@pytest.mark.parametrize("where", ["inside a record", "between records"])
@pytest.mark.parametrize("length", [True, False], ids=["Content-Length", "until close"])
async def test_a_tls_stream_cut_short_is_never_a_complete_body(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], where: str, length: bool
) -> None:
    conn, transport, peer = await connected(contexts)
    body = os.urandom(100_000)
    dest = bytearray(len(body))
    task = asyncio.create_task(conn.request(b"GET", memoryview(dest), START, 5.0))
    await asyncio.sleep(0)
    assert peer.tls.read(100) == b"GET"
    first = peer.send(head(body, length=length) + body[:50_000])  # whole records
    rest = peer.send(body[50_000:])
    wire = first + rest[:-1000] if where == "inside a record" else first
    deliver(conn, transport, wire, 4096)
    conn.connection_lost(None)  # the TCP stream ends, no close_notify
    got = await outcome(task)
    assert isinstance(got, ConnectionError)
    assert str(got).startswith("connection closed after ")


async def test_close_notify_inside_a_body_fails_the_request(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    conn, transport, peer = await connected(contexts)
    body = os.urandom(60_000)
    dest = bytearray(len(body))
    task = asyncio.create_task(conn.request(b"GET", memoryview(dest), START, 5.0))
    await asyncio.sleep(0)
    assert peer.tls.read(100) == b"GET"
    wire = peer.send(head(body) + body[:40_000])
    with pytest.raises(ssl.SSLWantReadError):
        peer.tls.unwrap()  # sends close_notify, then waits for ours
    deliver(conn, transport, wire + peer.outgoing.read(), 5000)
    got = await outcome(task)
    assert isinstance(got, ConnectionError)
    assert str(got) == "connection closed after 40000 of 60000 body bytes"


async def test_a_body_that_ends_with_the_connection_is_whole_at_close_notify(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    conn, transport, peer = await connected(contexts)
    body = os.urandom(70_000)
    dest = bytearray(len(body))
    task = asyncio.create_task(conn.request(b"GET", memoryview(dest), START, 5.0))
    await asyncio.sleep(0)
    assert peer.tls.read(100) == b"GET"
    wire = peer.send(head(body, length=False) + body)
    with pytest.raises(ssl.SSLWantReadError):
        peer.tls.unwrap()
    deliver(conn, transport, wire + peer.outgoing.read(), 9000)
    got = await outcome(task)
    assert isinstance(got, Response), got
    assert (got.status, got.headers["connection"]) == (206, "close")
    assert dest == body


async def test_a_tampered_record_fails_the_request_as_a_connection_error(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    conn, transport, peer = await connected(contexts)
    body = os.urandom(50_000)
    dest = bytearray(len(body))
    task = asyncio.create_task(conn.request(b"GET", memoryview(dest), START, 5.0))
    await asyncio.sleep(0)
    assert peer.tls.read(100) == b"GET"
    wire = bytearray(peer.send(head(body) + body))
    wire[30_000] ^= 1
    deliver(conn, transport, bytes(wire), 1 << 20)
    got = await outcome(task)
    assert isinstance(got, ConnectionError)
    assert str(got).startswith("TLS: [SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]")
    assert transport.aborted


async def test_a_pool_refuses_a_store_signed_by_another_ca_naming_ca_bundle(
    s3_tls: TlsStore, tmp_path: Path
) -> None:
    make_pki(tmp_path)
    pool = HttpPool(limit=2, connect_timeout=10, read_timeout=10, ca_bundle=tmp_path / "ca.pem")
    try:
        with pytest.raises(FailedPrecondition) as info:
            await pool.get_into(f"{s3_tls.server.endpoint}/b/k", {}, memoryview(bytearray(8)), 0)
    finally:
        await pool.aclose()
    assert str(info.value) == (
        f"{s3_tls.server.endpoint}: the store's TLS certificate does not verify against the "
        f"CAs in {tmp_path / 'ca.pem'} (certificate signature failure): set [s3] ca_bundle "
        "(or $AWS_CA_BUNDLE) to the PEM bundle of the CA that signed it"
    )
    assert pool.open_connections == 0
