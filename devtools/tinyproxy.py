"""Run a real forward proxy, tinyproxy (Debian's ``tinyproxy`` package), on loopback.

The proxy tests need a proxy that is not ours: tinyproxy takes absolute-URI requests and
CONNECT, adds ``Via`` to every request it forwards and logs each one, so a test can show
that every data GET went through it. ``scripts/setup`` installs it where it can (root with
apt-get); elsewhere: ``apt-get install tinyproxy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tensorferry.devtools.daemon import stop_group

INSTALL_HINT = (
    "tinyproxy is not installed: apt-get install tinyproxy (scripts/setup does it as root)"
)
#: What tinyproxy logs for each request it reads from a client.
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/1\.[01]")


def tinyproxy_binary() -> str | None:
    return shutil.which("tinyproxy") or next(
        (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if os.access(p, os.X_OK)),
        None,
    )


@dataclasses.dataclass(frozen=True)
class ForwardProxy:
    endpoint: str
    log: Path
    pid: int

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request tinyproxy read so far, in order."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_tinyproxy(
    workdir: Path, *, deny_urls: str | None = None, start_timeout: float = 10.0
) -> Iterator[ForwardProxy]:
    """tinyproxy on a free loopback port until the block ends. ``deny_urls``, an extended
    regular expression, makes tinyproxy refuse matching URLs with an error page of its own
    (403 "Filtered"), as a proxy that fails a request does."""
    binary = tinyproxy_binary()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "tinyproxy.log"
    port = _free_port()
    lines = [
        f"Port {port}", "Listen 127.0.0.1", "Timeout 60", f'LogFile "{log}"', "LogLevel Info",
        "MaxClients 1024", "Allow 127.0.0.1",
    ]  # fmt: skip
    # No User line: tinyproxy stays the user that starts it (it warns), so the log and
    # config under a test's private tmp_path stay readable to it.
    if deny_urls is not None:
        rules = workdir / "tinyproxy.filter"
        rules.write_text(deny_urls + "\n")
        lines += [f'Filter "{rules}"', "FilterURLs On", "FilterExtended On"]
    conf = workdir / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"tinyproxy exited with status {proc.returncode}:\n"
                    + log.read_text(errors="replace")
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tinyproxy did not listen on port {port} in time")
            time.sleep(0.05)
        yield ForwardProxy(f"http://127.0.0.1:{port}", log, proc.pid)
    finally:
        stop_group(proc, 5)
