"""The head of an HTTP/1.1 answer on the lean data path (``_http_conn``): whether a 206 may
land in its destination as the object's own bytes, and where an error answer's body ends.

A range lands only as the object's bytes of the planned version: a body that is
``Content-Length`` long or ends with the connection, with no transfer or content coding
(chunk framing written into an arena would become weights), and no ``ETag`` other than the
planned one (``If-Match`` alone trusts every cache on the path to honour it).
"""

from __future__ import annotations

import re

HEAD_MAX = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
#: Content codings whose body is still the stored object's bytes. ``aws-chunked`` is an
#: upload coding that some S3-compatible stores keep in the object's metadata and echo.
_PLAIN = ("", "identity", "aws-chunked")


class RangeMismatch(ConnectionError):
    """The store answered with a different range than asked for."""


class Unusable(Exception):
    """A 206 whose body is not the planned version's bytes as they are stored: none of it
    lands. Not a transport failure: the same route gives the same answer again."""


class Encoded(Unusable):
    """The body comes with a transfer or content coding (chunked, gzip)."""


class OtherVersion(Unusable):
    """The answer's ETag is not the planned one: bytes of another version of the object."""

    def __init__(self, planned: str, got: str) -> None:
        super().__init__(f"ETag {got}, not the planned {planned}")


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (names lowercased; repeated ones joined with ", ", so that two
    differing Content-Lengths never pass for one). ValueError for a malformed status line."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"malformed status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(parts[1]), headers


def normal_etag(value: str) -> str:
    """An ETag without its weak marker and quotes: listings and answers differ in both."""
    return value.strip().removeprefix("W/").strip('"')


def check_range(
    headers: dict[str, str], start: int, length: int, etag: str | None
) -> Exception | None:
    """Why a 206 for ``length`` bytes from ``start`` (of the version whose ETag is ``etag``)
    must not land, or None."""
    end = start + length - 1
    what = f"the store answered the range GET for bytes {start}-{end}"
    value = headers.get("content-range", "")
    m = _CONTENT_RANGE.fullmatch(value)
    if m is None or int(m.group(1)) != start or int(m.group(2)) != end:
        return RangeMismatch(f"{what} with Content-Range {value!r}")
    got = headers.get("etag")
    # An empty planned ETag (a listing without one) names no version to compare with.
    if etag and got is not None and normal_etag(etag) and normal_etag(got) != normal_etag(etag):
        return OtherVersion(etag, got)
    if "transfer-encoding" in headers:
        return Encoded(f"Transfer-Encoding: {headers['transfer-encoding']}")
    coding = headers.get("content-encoding", "")
    if coding.lower() not in _PLAIN:
        return Encoded(f"Content-Encoding: {coding}")
    if headers.get("content-length") not in (None, str(length)):
        return RangeMismatch(
            f"{what} with Content-Length {headers['content-length']} instead of {length}"
        )
    return None


def _chunked(headers: dict[str, str]) -> bool:
    codings = headers.get("transfer-encoding", "")
    return codings.rsplit(",", 1)[-1].strip().lower() == "chunked"


def ends_with_connection(headers: dict[str, str]) -> bool:
    """Whether only the connection's end delimits the body: not chunked, and a transfer
    coding (which overrides any length) or no Content-Length."""
    return not _chunked(headers) and (
        "transfer-encoding" in headers or "content-length" not in headers
    )


def error_body(headers: dict[str, str], data: bytes | bytearray) -> tuple[bytes, bool] | None:
    """The body of an error answer once ``data`` holds all of it: (body, whether the
    connection may carry another request); None while more is due (or only the connection's
    end delimits it)."""
    if ends_with_connection(headers):
        return None
    if _chunked(headers):
        try:
            found = dechunk(data)
        except ValueError:
            return bytes(data), False  # unreadable framing: nothing after it can be trusted
        if found is None:
            return None
        body, used = found
        return body, used == len(data)
    try:
        length = int(headers["content-length"])
    except ValueError:
        return bytes(data), False
    if len(data) < length:
        return None
    return bytes(data[:length]), len(data) == length


def dechunk(data: bytes | bytearray) -> tuple[bytes, int] | None:
    """A whole chunked body at the start of ``data``: (payload, bytes it took up), or None
    when it is not all there yet. ValueError for broken framing."""
    payload = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(data[pos:eol]).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise ValueError(f"bad chunk size line {bytes(data[pos:eol])[:40]!r}")
        size, pos = int(size_text, 16), eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("a chunk not followed by CRLF")
        payload += data[pos : pos + size]
        pos += size + 2
    while True:  # the trailer section ends with an empty line
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        if eol == pos:
            return bytes(payload), pos + 2
        pos = eol + 2
