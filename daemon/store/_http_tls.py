"""TLS of the lean data path, run by the connection protocol itself over plain TCP.

uvloop's SSL transport already decrypts into the protocol's buffer, several records at a
time, but it reads whatever has arrived: the kernel cannot gather bytes for it
(``SO_RCVLOWAT``), as it cannot know what TLS holds back (~250 KiB per wake-up with 32
ranges in flight here). Here the ciphertext lands in one large buffer of the pool's, goes
into a ``MemoryBIO``, and ``SSLObject.read(n, dest)`` decrypts it straight into the range's
destination, record after record in one loop per wake-up; the kernel gathers ciphertext
(up to ``LOWAT``): at most the body's plaintext still due less what TLS holds, which the
store must send anyway (each record's ciphertext is longer than its plaintext). What is
left is AES-GCM and the copies Python's ``ssl`` makes (docs/performance.md, "HTTPS").

A TLS alert, a bad record, ``close_notify`` or the connection's end inside a body fail the
request as a ``ConnectionError`` (retried); a certificate that does not verify is refused
for good, saying which setting names the CA (``certificate_refused``).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

from tensorferry.daemon.store._http_conn import LOWAT, Connection
from tensorferry.errors import FailedPrecondition

#: Ciphertext read per wake-up, shared by a pool's connections: each read is handed to the
#: BIO (a copy) before the loop can run another protocol's callback.
CIPHER_BUFFER = LOWAT + (64 << 10)
#: Below this much body still due, wake for any byte: the last records come as they come.
_MIN_MARK = 64 << 10
#: The most ciphertext of one record (header, 16 KiB, padding and tag) that OpenSSL may have
#: taken from the BIO into its own buffer while waiting for the rest of the record.
_RECORD = 5 + (1 << 14) + 256
#: The reason in an ssl error's text (botocore's wraps it in more text).
_VERIFY = re.compile(r"certificate verify failed: ([^(']+?)\s*(?:\(_ssl|'|$)")


def certificate_refused(what: str, detail: str, ca_bundle: Path | None) -> FailedPrecondition:
    """The error for a store whose certificate does not verify: never retried."""
    match = _VERIFY.search(detail)
    why = match.group(1).strip() if match else detail
    trusted = f"the CAs in {ca_bundle}" if ca_bundle is not None else "the system's CAs"
    return FailedPrecondition(
        f"{what}: the store's TLS certificate does not verify against {trusted} ({why}): "
        "set [s3] ca_bundle (or $AWS_CA_BUNDLE) to the PEM bundle of the CA that signed it"
    )


class TlsConnection(Connection):
    """A ``Connection`` that speaks TLS itself once ``start_tls`` is called (right after
    connecting, or inside a proxy's CONNECT tunnel); plain HTTP until then."""

    def __init__(self, cipher: memoryview) -> None:
        super().__init__()
        self._cipher = cipher
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._handshake: asyncio.Future[None] | None = None
        self._established = False

    async def start_tls(self, context: ssl.SSLContext, hostname: str, timeout: float) -> None:
        """Handshake with ``hostname``; ssl.SSLCertVerificationError when its certificate
        does not verify, ConnectionError when the handshake fails otherwise."""
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._handshake = asyncio.get_running_loop().create_future()
        try:
            self._shake()
            async with asyncio.timeout(timeout):
                await self._handshake
        finally:
            self._handshake = None

    def _shake(self) -> None:
        assert self._tls is not None
        assert self._handshake is not None
        try:
            self._tls.do_handshake()
            self._established = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError as exc:
            self._handshake.set_exception(exc)
        except ssl.SSLError as exc:
            self._handshake.set_exception(ConnectionError(f"TLS handshake failed: {exc}"))
        self._flush()
        if self._established and not self._handshake.done():
            self._handshake.set_result(None)

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def _send(self, data: bytes) -> None:
        if self._tls is None:
            super()._send(data)
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:  # a session the store has ended (an alert, close_notify)
            raise ConnectionResetError(f"TLS: {exc}") from None
        self._flush()

    # -- asyncio callbacks -------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._cipher if self._tls is not None else self._plain_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._tls is None:
            self._received(nbytes)
            return
        self._incoming.write(self._cipher[:nbytes])
        if not self._established:
            if self._handshake is None or self._handshake.done():
                return  # a handshake that failed: the connection is being dropped
            self._shake()
            if not self._established:
                return
        self._decrypt(self._tls)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(ConnectionError("connection closed in the TLS handshake"))
        super().connection_lost(exc)

    # -- decryption ---------------------------------------------------------------------
    def _decrypt(self, tls: ssl.SSLObject) -> None:
        """Every whole record buffered, decrypted where the answer's bytes go."""
        transport = self.transport
        # The C object's read, not SSLObject.read's Python wrapper around it: one frame less
        # per 16 KiB record (~0.04 CPU-s/GB). With a buffer it returns the count.
        read = cast(Callable[[int, memoryview], int], getattr(tls, "_sslobj", tls).read)
        try:
            while transport is not None and not transport.is_closing():
                dest, pos, want = self._dest, self._pos, self._want
                if self._in_body and dest is not None and pos < want:
                    # The body's records straight into the destination; one state update.
                    got = 0
                    try:
                        while pos + got < want:
                            n = read(want - pos - got, dest[pos + got : want])
                            if n == 0:
                                break
                            got += n
                    finally:
                        if got:
                            self._received(got)
                    if pos + got < want:  # close_notify inside the body
                        self._peer_closed()
                        return
                    continue
                buf = self._plain_buffer()
                n = read(len(buf), buf)
                if n == 0:
                    self._peer_closed()
                    return
                self._received(n)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self._fail(ConnectionError(f"TLS: {exc}"))
            return
        self._flush()  # a key update or an alert of ours
        self._mark()

    def _peer_closed(self) -> None:
        """close_notify: the store ends the connection (a body that ends with it is whole
        only if all its bytes came, which ``connection_lost`` checks)."""
        if self.transport is not None:
            self.transport.abort()

    def _gather(self, nbytes: int) -> None:
        # Under TLS the mark follows the ciphertext (``_mark``); lowering it is always safe.
        if self._tls is None or nbytes == 1:
            super()._gather(nbytes)

    def _mark(self) -> None:
        """Let the kernel gather ciphertext: no more than the body still due less what TLS
        holds (the BIO's bytes and a partial record inside OpenSSL), as each record's
        ciphertext outweighs its plaintext."""
        assert self._tls is not None
        due = self._want - self._pos if self._in_body else 0
        held = self._incoming.pending + self._tls.pending() + _RECORD
        mark = min(LOWAT, due - held)
        super()._gather(mark if mark >= _MIN_MARK else 1)
