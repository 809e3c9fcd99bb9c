"""HTTP/1.1 framing for the CountingProxy: message heads and body forwarding.

Bodies are forwarded byte for byte (chunk framing included) through an optional ``Tap`` that
counts payload bytes and applies the byte-level faults, so SigV4 and checksums still verify
whenever no fault is asked for.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from tensorferry.devtools.faults import Fault, Kind, Ledger

_READ = 1 << 20
# Large reader and writer buffers let one read() move a big slice, which is what keeps the
# per-chunk Python overhead small enough for ~1 GB/s on loopback.
BUFFER = 4 << 20
CHUNKED, UNTIL_EOF = -1, -2


class BadMessage(ValueError):
    pass


class Reset(Exception):
    pass


class Truncate(Exception):
    pass


# Failures a client or server may cause at any moment; they end one connection quietly.
QUIET = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, BadMessage)


class Head:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.decode("latin-1").split("\r\n")
        self.start = lines[0].split(" ", 2)
        if len(self.start) < 2:
            raise BadMessage(lines[0])
        self.lines = [line for line in lines[1:] if line]
        self.headers: dict[str, str] = {}
        for line in self.lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadMessage(line)
            key, value = name.strip().lower(), value.strip()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value

    def token(self, name: str, value: str) -> bool:
        return value in self.headers.get(name, "").lower()

    def framing(self, *, no_body: bool, until_eof: bool) -> int:
        if no_body:
            return 0
        if self.token("transfer-encoding", "chunked"):
            return CHUNKED
        if "content-length" in self.headers:
            return int(self.headers["content-length"])
        return UNTIL_EOF if until_eof else 0

    def without(self, name: str) -> bytes:
        kept = [ln for ln in self.lines if ln.partition(":")[0].strip().lower() != name]
        return "\r\n".join([" ".join(self.start), *kept, "", ""]).encode("latin-1")

    def rebuilt(self, replace: dict[str, str], drop: tuple[str, ...] = ()) -> bytes:
        names = {name.lower() for name in (*replace, *drop)}
        kept = [ln for ln in self.lines if ln.partition(":")[0].strip().lower() not in names]
        extra = [f"{name}: {value}" for name, value in replace.items()]
        return "\r\n".join([" ".join(self.start), *kept, *extra, "", ""]).encode("latin-1")


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


class Discard:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


class Chunker:
    """A Sink that sends what is written to it as chunks of that size (``rechunk``)."""

    def __init__(self, dst: Sink) -> None:
        self.dst = dst

    def write(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.dst.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def drain(self) -> None:
        await self.dst.drain()

    async def end(self) -> None:
        self.dst.write(b"0\r\n\r\n")
        await self.dst.drain()


class Tap:
    """Counts response body bytes and applies the byte-level faults by offset within the body."""

    def __init__(self, ledger: Ledger, kind: Kind, fault: Fault | None) -> None:
        self.ledger, self.kind, self.fault, self.offset = ledger, kind, fault, 0

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
                self.ledger.count_body(self.kind, len(chunk))
                raise Truncate(chunk)
            flip = self.fault.flip_byte_at
            if flip is not None and start <= flip < start + len(chunk):
                buf = bytearray(chunk)
                buf[flip - start] ^= 0xFF
                chunk = bytes(buf)
        self.offset += len(chunk)
        self.ledger.count_body(self.kind, len(chunk))
        return chunk, reset


async def _pipe(src: asyncio.StreamReader, dst: Sink, n: int, tap: Tap | None) -> None:
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
            except Truncate as cut:
                dst.write(cut.args[0])
                await dst.drain()
                raise
        dst.write(chunk)
        await dst.drain()
        if reset:
            raise Reset


async def forward(src: asyncio.StreamReader, dst: Sink, framing: int, tap: Tap | None) -> None:
    if framing != CHUNKED:
        await _pipe(src, dst, framing, tap)
    else:
        # Chunk framing is forwarded verbatim; only the payload goes through the tap.
        while True:
            line = await src.readuntil(b"\r\n")
            dst.write(line)
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError as exc:
                raise BadMessage(line) from exc
            if size == 0:
                break
            await _pipe(src, dst, size, tap)
            dst.write(await src.readexactly(2))
        while line != b"\r\n":
            line = await src.readuntil(b"\r\n")
            dst.write(line)
        await dst.drain()
    if tap is not None and tap.fault is not None and tap.fault.reset_after is not None:
        raise Reset  # the body was shorter than reset_after: reset anyway, after it
