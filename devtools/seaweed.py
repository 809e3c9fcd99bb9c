"""Launch a throwaway SeaweedFS S3 server (``weed mini``) on loopback.

Used by the demo, the pytest fixtures and the benchmarks. Several instances may run at once:
every port is chosen here and passed explicitly, and credentials are fresh per run.

CLI: ``python -m tensorferry.devtools.seaweed --dir DIR`` prints ``export`` lines and serves
until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

# The project's mypy config covers these; the explicit ignores keep `mypy --strict FILE` clean too.
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped, unused-ignore]

from tensorferry.devtools.s3server import ADMIN_IDENTITY, S3Server, make_client, weed_binary

# Callers import S3Server and weed_binary from here, where they lived before s3server.py.
__all__ = ["REGION", "S3Server", "main", "run_seaweed", "weed_binary"]

_log = logging.getLogger(__name__)

REGION = "us-east-1"
_HOST = "127.0.0.1"
# Without -ip/-ip.bind weed picks an outside address and binds 0.0.0.0. The admin listeners
# stay open even with -admin.ui=false, so they get ports too.
_FIXED_FLAGS = (
    f"-ip={_HOST} -ip.bind={_HOST} -master.telemetry=false -s3.port.iceberg=0 -s3.port.lance=0 "
    "-admin.ui=false -webdav=false"
).split()
# Every listener left: their defaults are fixed numbers (a busy default silently moves to the
# next port), so each instance gets its own. s3.port must stay first.
_PORT_FLAGS = [
    f"{svc}.port{grpc}"
    for svc in ("s3", "master", "volume", "filer", "admin")
    for grpc in ("", ".grpc")
]
_START_TRIES = 3
_STOP_GRACE_S = 10.0


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the kernel hands out n distinct ports.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((_HOST, 0))
        return [s.getsockname()[1] for s in socks]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _stop(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    # Once Popen has reaped the leader its pid may be reused: signal the group only before that.
    if proc.returncode is None:
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            # WNOWAIT keeps the leader a zombie, so the group id stays ours until the SIGKILL.
            # A clean `weed mini` shutdown takes 2-4 s (the volume server waits preStopSeconds).
            deadline = time.monotonic() + _STOP_GRACE_S
            while time.monotonic() < deadline:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    break
                time.sleep(0.05)
        finally:
            # Also reached when a second Ctrl-C cuts the grace period short.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # weed leaves /tmp/seaweedfs-s3-<port>.sock behind; the path is hard-coded to /tmp.
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if sock.is_socket():
                    sock.unlink()


def _wait_ready(proc: subprocess.Popen[bytes], server: S3Server, port: int, deadline: float) -> str:
    """Return "" once ListBuckets works with our keys, else why not."""
    while True:
        if proc.poll() is not None:
            return f"weed exited with status {proc.returncode}"
        if time.monotonic() > deadline:
            return f"S3 port {port} did not accept connections in time"
        try:
            socket.create_connection((_HOST, port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    # Success with freshly generated keys proves the port is ours, not another instance's.
    client = make_client(server, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    try:
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"weed exited with status {proc.returncode}"
            try:
                client.list_buckets()
                return ""
            except (BotoCoreError, ClientError) as e:
                last = repr(e)
            time.sleep(0.1)
        return f"ListBuckets never succeeded: {last}"
    finally:
        client.close()


@contextlib.contextmanager
def run_seaweed(
    workdir: Path,
    *,
    log_path: Path | None = None,
    start_timeout: float = 60.0,
    extra_flags: Sequence[str] = (),
) -> Iterator[S3Server]:
    """``weed mini`` under ``workdir`` until the block ends; ``extra_flags`` go after ours."""
    workdir = Path(workdir).resolve()
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path if log_path is not None else workdir / "weed.log"
    access_key, secret_key = "TF" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    identities = workdir / "s3-identities.json"
    # 0600: the file holds the secret key.
    admin = {
        "name": ADMIN_IDENTITY,
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": [admin]}, f)
    binary = weed_binary()
    failures: list[str] = []
    for attempt in range(1, _START_TRIES + 1):
        ports = _free_ports(len(_PORT_FLAGS))
        s3_port = ports[0]
        # -logtostderr: glog would otherwise write weed.* files into /tmp.
        cmd = [
            binary,
            "-logtostderr",
            "mini",
            f"-dir={data_dir}",
            f"-s3.config={identities}",
            *_FIXED_FLAGS,
            *(f"-{flag}={port}" for flag, port in zip(_PORT_FLAGS, ports, strict=True)),
            *extra_flags,
        ]
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            log.write(f"\n=== tensorferry: start attempt {attempt}: {shlex.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal must not reach weed directly
            )
        try:
            server = S3Server(
                endpoint=f"http://{_HOST}:{s3_port}",
                access_key=access_key,
                secret_key=secret_key,
                region=REGION,
                data_dir=data_dir,
                pid=proc.pid,
                master=f"{_HOST}:{ports[_PORT_FLAGS.index('master.port')]}",
                master_grpc_port=ports[_PORT_FLAGS.index("master.port.grpc")],
                filer=f"{_HOST}:{ports[_PORT_FLAGS.index('filer.port')]}",
                filer_grpc_port=ports[_PORT_FLAGS.index("filer.port.grpc")],
            )
            why = _wait_ready(proc, server, s3_port, t0 + start_timeout)
            if not why:
                took = time.monotonic() - t0
                _log.info(
                    "SeaweedFS S3 up at %s in %.2f s (try %d)", server.endpoint, took, attempt
                )
                yield server
                return
        finally:
            _stop(proc, ports)
        failures.append(f"attempt {attempt}: {why}")
    raise RuntimeError(
        f"SeaweedFS failed to start ({'; '.join(failures)}); log {log_path}:\n"
        + _log_tail(log_path)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, required=True, help="work dir (data, log, keys)")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)  # unwinds through run_seaweed, which stops weed

    signal.signal(signal.SIGTERM, on_sigterm)
    # A shell starting us with `&` makes SIGINT ignored; Ctrl-C / kill -INT must still stop weed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.monotonic()
    try:
        with run_seaweed(args.dir) as server:
            for key, value in server.env().items():
                print(f"export {key}={shlex.quote(value)}")
            print(
                f"# SeaweedFS pid {server.pid} ready in {time.monotonic() - t0:.2f} s; "
                "Ctrl-C to stop",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
