"""The lean data path's connection protocol (``_http_conn.Connection``), fed answers byte
by byte: every answer is cut at every position, as the kernel may split it (#25)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tensorferry.daemon.store._http_conn import Connection, Response
from tensorferry.daemon.store._http_head import (
    Encoded,
    OtherVersion,
    RangeMismatch,
    dechunk,
    error_body,
    normal_etag,
)

BODY = bytes(range(7, 47))  # 40 bytes: bytes 100-139 of an object
ETAG = '"9b2cf535f27731c974343645a3985328"'
RANGE = b"Content-Range: bytes 100-139/1000\r\n"
XML = b"<Error><Code>SlowDown</Code>0\r\n\r\n</Error>"  # holds what looks like a last chunk


class FakeTransport:
    """What the protocol writes to and aborts; aborting loses the connection, as asyncio's
    transports do, one loop turn later."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.aborted = conn, False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


def _deliver(conn: Connection, transport: FakeTransport, data: bytes) -> None:
    while data and not transport.aborted:
        buf = conn.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


async def _exchange(
    answer: bytes, cut: int, *, close: bool = False, etag: str | None = None,
    connect: bool = False,
) -> tuple[Response | BaseException | None, bytearray]:  # fmt: skip
    """The outcome of one request whose ``answer`` arrives in two reads cut at ``cut`` (the
    peer closing after it if ``close``): the response or error, None while still waiting;
    and the destination."""
    conn = Connection()
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    dest = bytearray(len(BODY))
    if connect:
        task = asyncio.create_task(conn.tunnel(b"CONNECT h:443 HTTP/1.1\r\n\r\n", 5.0))
    else:
        task = asyncio.create_task(conn.request(b"GET", memoryview(dest), 100, 5.0, etag))
    await asyncio.sleep(0)  # the request is sent
    _deliver(conn, transport, answer[:cut])
    _deliver(conn, transport, answer[cut:])
    if close and not transport.aborted:
        conn.connection_lost(None)
    for _ in range(3):  # the waiter's result reaches the task in a loop turn or two
        await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
        return None, dest
    return (task.exception() or task.result()), dest


def _cuts(answer: bytes) -> range:
    return range(len(answer) + 1)


def _206(*headers: bytes, body: bytes = BODY) -> bytes:
    return b"HTTP/1.1 206 Partial Content\r\n" + RANGE + b"".join(headers) + b"\r\n" + body


def _chunked(payload: bytes, size: int = 7) -> bytes:
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        (b"Content-Length: 40\r\n",),
        (b"Content-Length: 40\r\n", b"ETag: " + ETAG.encode() + b"\r\n"),
        (b"Content-Length: 40\r\n", b'ETag: W/"9b2cf535f27731c974343645a3985328"\r\n'),
        (b"Content-Length: 40\r\n", b"ETag: 9b2cf535f27731c974343645a3985328\r\n"),
        (b"Content-Length: 40\r\n", b"Content-Encoding: aws-chunked\r\n"),
    ],
)
async def test_a_plain_range_lands_whole_and_keeps_the_connection(
    headers: tuple[bytes, ...],
) -> None:
    answer = _206(*headers)
    for cut in _cuts(answer):
        got, dest = await _exchange(answer, cut, etag=ETAG)
        assert isinstance(got, Response), (cut, got)
        assert (got.status, bytes(dest), got.headers.get("connection")) == (206, BODY, None)


@pytest.mark.parametrize(
    ("headers", "coding"),
    [
        ((b"Transfer-Encoding: chunked\r\n",), "Transfer-Encoding: chunked"),
        ((b"Content-Length: 40\r\n", b"Transfer-Encoding: chunked\r\n"),
         "Transfer-Encoding: chunked"),
        ((b"Content-Length: 40\r\n", b"Content-Encoding: gzip\r\n"), "Content-Encoding: gzip"),
        ((b"Content-Encoding: br\r\n",), "Content-Encoding: br"),
    ],
)  # fmt: skip
async def test_a_range_with_a_coding_is_refused_and_nothing_lands(
    headers: tuple[bytes, ...], coding: str
) -> None:
    chunked = b"chunked" in b"".join(headers)
    answer = _206(*headers, body=_chunked(BODY) if chunked else BODY)
    for cut in _cuts(answer):
        got, dest = await _exchange(answer, cut, close=True)
        assert isinstance(got, Encoded), (cut, got)
        assert (str(got), dest) == (coding, bytearray(len(BODY)))


async def test_a_range_of_another_version_is_refused_and_nothing_lands() -> None:
    answer = _206(b"Content-Length: 40\r\n", b'ETag: "0123456789abcdef"\r\n')
    for cut in _cuts(answer):
        got, dest = await _exchange(answer, cut, etag=ETAG)
        assert isinstance(got, OtherVersion), (cut, got)
        assert str(got) == f'ETag "0123456789abcdef", not the planned {ETAG}'
        assert dest == bytearray(len(BODY))
    # Without a planned ETag (or an empty one, from a listing without ETags) any passes.
    for planned in (None, '""'):
        got, _ = await _exchange(answer, 0, etag=planned)
        assert isinstance(got, Response)


async def test_a_range_without_a_length_ends_exactly_with_the_connection() -> None:
    answer = _206()
    for cut in _cuts(answer):
        got, dest = await _exchange(answer, cut)
        assert got is None, cut  # not done until the connection ends: more might follow
        got, dest = await _exchange(answer, cut, close=True)
        assert isinstance(got, Response), (cut, got)
        assert (bytes(dest), got.headers["connection"]) == (BODY, "close")
    longer = answer + b"!"
    for cut in _cuts(longer):
        got, _ = await _exchange(longer, cut, close=True)
        assert isinstance(got, ConnectionError), (cut, got)
        assert str(got) == "the store sent more bytes than the range it announced"
    shorter = answer[:-1]
    for cut in _cuts(shorter):
        got, _ = await _exchange(shorter, cut, close=True)
        assert isinstance(got, ConnectionError), (cut, got)
        assert str(got) == "connection closed after 39 of 40 body bytes"


async def test_a_wrong_length_is_a_range_mismatch() -> None:
    answer = _206(b"Content-Length: 41\r\n", body=BODY + b"!")
    got, _ = await _exchange(answer, len(answer))
    assert isinstance(got, RangeMismatch)
    assert str(got) == (
        "the store answered the range GET for bytes 100-139 with Content-Length 41 instead of 40"
    )


async def test_a_chunked_error_body_is_read_to_its_last_chunk() -> None:
    head = b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = head + _chunked(XML, size=5)
    for cut in _cuts(answer):
        got, _ = await _exchange(answer, cut)
        assert isinstance(got, Response), (cut, got)
        # Read exactly to its end: the connection can carry the next request.
        assert (got.status, bytes(got.body), got.headers.get("connection")) == (503, XML, None)
    for cut in _cuts(answer[:-2]):
        got, _ = await _exchange(answer[:-2], cut, close=True)
        assert isinstance(got, ConnectionError), (cut, got)


async def test_an_error_body_without_length_ends_with_the_connection() -> None:
    answer = b"HTTP/1.0 502 Bad Gateway\r\nContent-Type: text/html\r\n\r\n<h1>502</h1>"
    for cut in _cuts(answer):
        got, _ = await _exchange(answer, cut, close=True)
        assert isinstance(got, Response), (cut, got)
        assert (got.status, bytes(got.body), got.headers["connection"]) == (
            502, b"<h1>502</h1>", "close",
        )  # fmt: skip


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 22\r\n\r\n<h1>403 Forbidden</h1>",
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
        b"Content-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked(b"<h1>407</h1>"),
    ],
)
async def test_a_refused_connect_comes_back_with_its_page(answer: bytes) -> None:
    for cut in _cuts(answer):
        got, _ = await _exchange(answer, cut, connect=True)
        assert isinstance(got, Response), (cut, got)
        assert got.status in (403, 407)
        assert bytes(got.body) in (b"<h1>403 Forbidden</h1>", b"<h1>407</h1>")


async def test_an_open_tunnel_is_its_head_alone() -> None:
    answer = b"HTTP/1.1 200 Connection established\r\n\r\n"
    more = answer + b"\x16\x03"
    for cut in _cuts(more):
        got, _ = await _exchange(more, cut, connect=True)
        if cut == len(answer):  # read after the answer: the TLS layer's, once it runs
            assert isinstance(got, Response), got
            assert got.status == 200
        else:
            assert isinstance(got, ConnectionError), (cut, got)
            assert str(got) == "the proxy sent bytes after its CONNECT answer"


def test_chunked_framing_and_etags() -> None:
    assert dechunk(_chunked(XML, 3) + b"next") == (XML, len(_chunked(XML, 3)))
    assert dechunk(b"4;ext=1\r\nabcd\r\n0\r\nTrailer: x\r\n\r\n") == (b"abcd", 32)
    assert dechunk(b"4\r\nabcd\r\n0\r\nTrailer: x\r\n") is None
    with pytest.raises(ValueError, match="bad chunk size line"):
        dechunk(b"zz\r\n")
    with pytest.raises(ValueError, match="a chunk not followed by CRLF"):
        dechunk(b"2\r\nabcd\r\n")
    assert error_body({"transfer-encoding": "chunked"}, b"zz\r\n") == (b"zz\r\n", False)
    assert error_body({"content-length": "3"}, b"abcd") == (b"abc", False)
    assert error_body({"transfer-encoding": "gzip"}, b"abcd") is None  # ends with the close
    assert normal_etag('W/"abc-2"') == normal_etag("abc-2") == normal_etag(' "abc-2" ') == "abc-2"
