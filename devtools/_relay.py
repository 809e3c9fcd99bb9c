"""One CountingProxy connection: relays request/response exchanges and applies the faults.

Each downstream connection gets its own upstream connection, so keep-alive, ``100-continue``
and early answers never mix two clients' byte streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from http.client import responses

from tensorferry.devtools._wire import (
    BUFFER,
    QUIET,
    UNTIL_EOF,
    Chunker,
    Discard,
    Head,
    Reset,
    Tap,
    Truncate,
    forward,
)
from tensorferry.devtools.faults import Fault, Ledger, RequestInfo, classify

_EARLY_BODY_GRACE_S = 2.0


def _fault_headers(fault: Fault | None) -> dict[str, str]:
    """The answer headers a fault replaces (or adds)."""
    replace: dict[str, str] = {}
    if fault is not None:
        if fault.content_range is not None:
            replace["Content-Range"] = fault.content_range
        if fault.etag is not None:
            replace["ETag"] = fault.etag
        if fault.content_encoding is not None:
            replace["Content-Encoding"] = fault.content_encoding
    return replace


class Connection:
    """One downstream connection and the upstream connection that serves it. Failures that
    are proxy bugs or failing hooks go to ``errors``, which the proxy raises from
    ``__exit__``."""

    def __init__(
        self,
        ledger: Ledger,
        upstream: tuple[str, int],
        errors: list[BaseException],
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
    ) -> None:
        self.ledger, self.address, self.errors = ledger, upstream, errors
        self.down_r, self.down_w = r, w
        self.up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.hang_fault = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.down_w] if self.up is None else [self.down_w, self.up[1]]

    async def serve(self) -> None:
        try:
            while await self.exchange(await self.down_r.readuntil(b"\r\n\r\n")):
                pass
        except Reset:
            transport = self.down_w.transport
            transport.set_write_buffer_limits(high=0)  # drain() now waits for an empty buffer
            with contextlib.suppress(*QUIET):
                await self.down_w.drain()
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        except Truncate:
            if self.hang_fault:
                # Headers promised more; the client must notice the silence (read timeout).
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)
        except QUIET:
            pass
        except RuntimeError as exc:
            # uvloop raises RuntimeError (not OSError) when writing to a transport the
            # client already aborted, e.g. after its read timeout during a stall.
            if "closed" not in str(exc):
                self.errors.append(exc)
        except Exception as exc:  # a proxy bug or a failing hook: surfaced from __exit__
            self.errors.append(exc)
        finally:
            self.ledger.count_connection(-1)
            for writer in self.writers():
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.up is not None and (self.up[0].at_eof() or self.up[1].is_closing()):
            await self.drop_upstream()
        if self.up is None:
            host, port = self.address
            self.up = await asyncio.open_connection(host, port, limit=BUFFER)
            self.up[1].transport.set_write_buffer_limits(high=BUFFER)
        return self.up

    async def drop_upstream(self) -> None:
        if self.up is not None:
            writer, self.up = self.up[1], None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def exchange(self, raw: bytes) -> bool:
        """Serve one request; True when the downstream connection stays open."""
        req = Head(raw)
        method, target = req.start[0], req.start[1]
        kind = classify(method, target, req.headers)
        info, fault = self.ledger.admit(kind, method, target, req.headers)
        req_framing = req.framing(no_body=False, until_eof=False)
        expect = req.token("expect", "100-continue")
        close = req.token("connection", "close") or req.start[-1] == "HTTP/1.0"
        if fault is not None and fault.status is not None:
            return await self.answer(info, fault, req_framing, expect, close)

        up_r, up_w = await self.upstream()
        if fault is not None and fault.drop_range:
            raw = req.without("range")
        self.hang_fault = fault is not None and fault.hang
        up_w.write(raw)
        sent = asyncio.Event()  # the whole request body is in upstream's transport
        body = None
        if req_framing != 0:
            body = asyncio.create_task(self.send_body(up_w, req_framing, sent))
        else:
            sent.set()
        drop = continued = False
        try:
            while True:
                resp = Head(await up_r.readuntil(b"\r\n\r\n"))
                status = int(resp.start[1])
                if status >= 200:
                    break
                self.down_w.write(resp.raw)  # 100 Continue and friends pass through
                await self.down_w.drain()
                continued = True
            drop = resp.token("connection", "close")
            if not sent.is_set():
                # Upstream answered before the body was through (an early error). A client that
                # waited on 100-continue never sends it; one mid-upload may still be sending:
                # either way this connection's stream position is unknown, so close it after.
                close = drop = True
                if body is not None and expect and not continued:
                    body.cancel()
            framing = resp.framing(no_body=method == "HEAD" or status in (204, 304), until_eof=True)
            if framing == UNTIL_EOF:
                close = drop = True
            replace = _fault_headers(fault)
            remove: tuple[str, ...] = ()
            chunker = None
            if fault is not None and framing > 0 and (fault.rechunk or fault.until_close):
                # Only a Content-Length body is reshaped: a chunked one would need decoding.
                remove = ("content-length",)
                if fault.rechunk:
                    replace["Transfer-Encoding"] = "chunked"
                    chunker = Chunker(self.down_w)
                else:
                    close = True
            if close and not resp.token("connection", "close"):
                replace["Connection"] = "close"
            if fault is not None and fault.stall is not None:
                await asyncio.sleep(fault.stall)
            self.down_w.write(resp.rebuilt(replace, remove) if replace or remove else resp.raw)
            try:
                tap = Tap(self.ledger, kind, fault)
                await forward(up_r, chunker or self.down_w, framing, tap)
                if chunker is not None:
                    await chunker.end()
            except (Reset, Truncate):
                drop = True  # the upstream body was not read to its end
                raise
        finally:
            if body is not None:
                if not body.done():
                    await asyncio.wait([body], timeout=_EARLY_BODY_GRACE_S)
                    body.cancel()
                    await asyncio.wait([body])
                if not body.cancelled():
                    body.exception()  # its failure shows on the response side; mark it seen
            if drop:
                await self.drop_upstream()
        return not close

    async def send_body(
        self, up_w: asyncio.StreamWriter, framing: int, sent: asyncio.Event
    ) -> None:
        await forward(self.down_r, up_w, framing, None)
        sent.set()

    async def answer(
        self, info: RequestInfo, fault: Fault, framing: int, expect: bool, close: bool
    ) -> bool:
        if framing != 0:
            if expect:
                close = True  # the client waits for 100 before its body; it never gets one
            else:
                await forward(self.down_r, Discard(), framing, None)
        status = fault.status or 503
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{fault.s3_code}</Code><Message>injected by CountingProxy</Message>"
            f"<Resource>{info.path.partition('?')[0]}</Resource>"
            f"<RequestId>proxy-{info.number}</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {responses.get(status, 'Injected')}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: proxy-{info.number}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode()
        if info.method == "HEAD":
            body = b""
        if fault.stall is not None:
            await asyncio.sleep(fault.stall)
        self.ledger.count_body(info.kind, len(body))
        self.down_w.write(head + body)
        await self.down_w.drain()
        return not close
