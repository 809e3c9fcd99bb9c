"""Start a tensorferry daemon as a subprocess: the one place tests, benches and examples
spawn `tensorferry serve`.

The daemon runs in its own process group (as systemd would run it), with an allowlist and
the store's credentials in its environment. `daemon_subprocess` is the whole lifecycle; tests use
the parts (`write_config`, `spawn_daemon`, `wait_serving`) to hold on to a daemon that
must crash, refuse or be killed. Keep ``workdir`` short (under /tmp): a Unix socket path
longer than 107 bytes fails to bind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tensorferry.client import Client, TensorferryError
from tensorferry.devtools.seaweed import S3Server
from tensorferry.v1 import tensorferry_pb2 as pb

#: Where CPU arenas live (the daemon's shm_dir).
SHM = Path("/dev/shm")


def shm_files(instance: str, shm: Path = SHM) -> list[str]:
    """Every /dev/shm file of a daemon instance: segments, its lock, recycled arenas."""
    return sorted(p.name for p in shm.glob(f"tensorferry.{instance}.*"))


def live_segments(instance: str, shm: Path = SHM) -> list[str]:
    """A daemon instance's arenas: not its lock, freed arenas kept for reuse, manifests of
    sealed arenas or a manifest being written."""
    return [
        n for n in shm_files(instance, shm)
        if not n.endswith((".lock", ".sealed")) and ".free" not in n and ".sealing-" not in n
    ]  # fmt: skip


def remove_sealed(instance: str, shm: Path = SHM) -> list[str]:
    """Remove the sealed arenas a stopped daemon left for its successor ([memory] adopt)
    and their manifests; the segments left without one (a leak)."""
    unsealed = []
    for name in live_segments(instance, shm):
        manifest = shm / f"{name}.sealed"
        if manifest.exists():
            manifest.unlink()
            (shm / name).unlink(missing_ok=True)
        else:
            unsealed.append(name)
    return unsealed


@dataclasses.dataclass(frozen=True)
class DaemonProcess:
    socket: Path
    proc: subprocess.Popen[bytes]
    #: The environment a worker process needs (socket and store credentials).
    env: dict[str, str]


def serve_argv(config: Path, socket: Path, args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "tensorferry", "serve", "--config", str(config),
            "--socket", str(socket), *args]  # fmt: skip


def write_config(
    workdir: Path, allow: Sequence[str], *, prelude: str = "", s3: str = "", extra: str = ""
) -> Path:
    """``workdir / "tensorferry.toml"``: top-level keys (``prelude``), the allowlist, path-style
    S3 plus ``s3`` keys, then ``extra`` tables."""
    allow_toml = ", ".join(f'"{a}"' for a in allow)
    config = workdir / "tensorferry.toml"
    config.write_text(
        f'{prelude}[sources]\nallow = [{allow_toml}]\n[s3]\naddressing_style = "path"\n'
        f"{s3}\n{extra}"
    )
    return config


def with_memory_key(extra: str, line: str) -> str:
    """``extra`` config tables with ``line`` in its [memory] table (added if absent), unless
    that key is set there already."""
    key = line.split("=")[0].strip()
    lines = extra.splitlines()
    if "[memory]" not in lines:
        return f"{extra}\n[memory]\n{line}\n"
    at = lines.index("[memory]")
    end = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    if any(x.split("=")[0].strip() == key for x in lines[at + 1 : end]):
        return extra
    return "\n".join([*lines[: at + 1], line, *lines[at + 1 :]]) + "\n"


def spawn_daemon(
    config: Path, socket: Path, env: Mapping[str, str], *, args: Sequence[str] = (),
    log: Path | None = None,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """`tensorferry serve` in a session of its own; its output goes to ``log`` when given.
    It does not wait: see `wait_serving`."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(log, "ab")) if log is not None else None
        return subprocess.Popen(
            serve_argv(config, socket, args), env=dict(env), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
        )  # fmt: skip


def wait_serving(
    proc: subprocess.Popen[bytes], socket: Path, *, timeout: float = 30.0, log: Path | None = None
) -> pb.StatusResponse:
    """The daemon's first Status answer. If it exits or stays silent past ``timeout``, its
    process group is killed and RuntimeError carries its log."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        # The socket file exists a moment before the daemon answers on it.
        if socket.exists():
            with contextlib.suppress(TensorferryError), Client(socket) as client:
                return client.status()
        time.sleep(0.05)
    if proc.poll() is None:
        why = f"did not answer on {socket} within {timeout} s"
        kill_group(proc)
    else:
        why = f"exited with status {proc.returncode}"
    output = log.read_text(errors="replace") if log is not None else ""
    raise RuntimeError(f"the daemon {why}" + (f":\n{output}" if output else ""))


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to the process group (a server and the children it started), then SIGKILL
    if it has not stopped within ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL to the group if it has not stopped within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)


@contextlib.contextmanager
def daemon_subprocess(
    workdir: Path, s3: S3Server | None, allow: list[str], *, extra_config: str = "",
    start_timeout: float = 30.0, log: Path | None = None,
) -> Iterator[DaemonProcess]:  # fmt: skip
    """The daemon on ``workdir / "tf.sock"`` until the block ends, then stopped with SIGTERM.

    A throwaway daemon: its arenas are removed at exit, not left for a next one on this
    socket (``[memory] adopt = false``) unless ``extra_config`` says otherwise.
    """
    socket = workdir / "tf.sock"
    config = write_config(workdir, allow, extra=with_memory_key(extra_config, "adopt = false"))
    env = {**os.environ, **(s3.env() if s3 else {})}
    proc = spawn_daemon(config, socket, env, log=log)
    try:
        wait_serving(proc, socket, timeout=start_timeout, log=log)
        yield DaemonProcess(socket, proc, {**env, "TENSORFERRY_SOCKET": str(socket)})
    finally:
        stop_daemon(proc)
