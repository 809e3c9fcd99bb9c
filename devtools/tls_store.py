"""A throwaway https S3 store: SeaweedFS serving its S3 API over TLS itself (Go's TLS, as a
real store's front end would be), with certificates from a throwaway CA (``pki``).

``weed mini`` keeps its plain S3 port and adds ``-s3.port.https``: uploads and bucket set-up
may use ``plain``, the daemon under test talks to ``server`` (https) and trusts ``ca``
through ``[s3] ca_bundle``.

CLI: ``python -m tensorferry.devtools.tls_store --dir DIR`` prints ``export`` lines (the
https endpoint and ``AWS_CA_BUNDLE``) and serves until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from tensorferry.devtools.pki import make_pki
from tensorferry.devtools.s3server import S3Server
from tensorferry.devtools.seaweed import _free_ports, run_seaweed

_HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class TlsStore:
    #: The store over https (same keys as ``plain``).
    server: S3Server
    #: The same store over plain HTTP (set-up, uploads, a TLS terminator's upstream).
    plain: S3Server
    #: PEM bundle of the CA that signed the store's certificate.
    ca: Path
    #: The server certificate and key, for other TLS terminators in front of ``plain``.
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context with the store's certificate (for a TLS terminator)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


#: Starts with fresh ports when the https port turned out to be another server's.
_TRIES = 3
#: Seconds for the https port to answer once the plain one does (weed starts both at once).
_HTTPS_WAIT = 15.0


def _check_tls(port: int, ca: Path, deadline: float) -> str:
    """ "" once ``port`` completes a handshake whose certificate verifies against ``ca``, a
    CA made for this store alone: that proves the port is this weed's, not a server that
    took it first (weed then silently listens on the next port). Else why not."""
    context = ssl.create_default_context(cafile=str(ca))
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection((_HOST, port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=_HOST),
            ):
                return ""
        except ssl.SSLError as exc:  # a TLS answer, or bytes, from some other server
            return f"https port {port} is another server's ({exc})"
        except OSError as exc:  # not listening yet
            last = exc
            time.sleep(0.05)
    return f"SeaweedFS's https port {port} never completed a handshake: {last}"


@contextlib.contextmanager
def run_seaweed_tls(workdir: Path, *, start_timeout: float = 60.0) -> Iterator[TlsStore]:
    """``weed mini`` with its S3 API on https as well, until the block ends."""
    workdir = Path(workdir).resolve()
    pki_dir = workdir / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    make_pki(pki_dir)
    cert, key = pki_dir / "server.pem", pki_dir / "server_key.pem"
    failures = []
    for attempt in range(1, _TRIES + 1):
        # Chosen like weed's other ports: one taken meanwhile is seen by ``_check_tls``.
        [port] = _free_ports(1)
        flags = [f"-s3.cert.file={cert}", f"-s3.key.file={key}", f"-s3.port.https={port}"]
        with run_seaweed(workdir, start_timeout=start_timeout, extra_flags=flags) as plain:
            why = _check_tls(port, pki_dir / "ca.pem", time.monotonic() + _HTTPS_WAIT)
            if not why:
                server = dataclasses.replace(plain, endpoint=f"https://{_HOST}:{port}")
                yield TlsStore(server, plain, pki_dir / "ca.pem", cert, key)
                return
        failures.append(f"attempt {attempt}: {why}")
    raise RuntimeError("SeaweedFS with https did not start: " + "; ".join(failures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, required=True, help="work dir (data, log, keys)")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with run_seaweed_tls(args.dir) as store:
            for name, value in {**store.server.env(), "AWS_CA_BUNDLE": str(store.ca)}.items():
                print(f"export {name}={shlex.quote(value)}")
            sys.stdout.flush()
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
