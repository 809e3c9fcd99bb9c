"""Start a tensorferry daemon as a subprocess beside a local store: demo, examples, benches.

The daemon runs in its own process group (as systemd would run it) with an allowlist and
the store's credentials in its environment; leaving the context stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tensorferry.devtools.seaweed import S3Server


@dataclasses.dataclass(frozen=True)
class DaemonProcess:
    socket: Path
    proc: subprocess.Popen[bytes]
    #: The environment a worker process needs (socket and store credentials).
    env: dict[str, str]


@contextlib.contextmanager
def run_daemon(
    workdir: Path, s3: S3Server | None, allow: list[str], *, extra_config: str = "",
    start_timeout: float = 30.0, log: Path | None = None,
) -> Iterator[DaemonProcess]:  # fmt: skip
    """The daemon on ``workdir / "tf.sock"``; its output goes to ``log`` when given."""
    socket = workdir / "tf.sock"
    config = workdir / "tensorferry.toml"
    allow_toml = ", ".join(f'"{a}"' for a in allow)
    config.write_text(
        f'[sources]\nallow = [{allow_toml}]\n[s3]\naddressing_style = "path"\n{extra_config}'
    )
    env = {**os.environ, **(s3.env() if s3 else {}), "TENSORFERRY_SOCKET": str(socket)}
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(log, "ab")) if log is not None else None
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorferry", "serve", "--config", str(config)],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT if out else None,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                where = f"; see {log}" if log is not None else ""
                raise RuntimeError(f"the daemon did not start (exit status {proc.poll()}){where}")
            time.sleep(0.05)
        yield DaemonProcess(socket, proc, env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
