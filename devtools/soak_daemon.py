"""The soak's daemon: started, SIGKILLed as systemd kills a crashed service (the whole
process group), restarted on the same socket, watched while the workers run, and checked
for leftovers once it stops."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tensorferry.client import Client, TensorferryError
from tensorferry.devtools.daemon import (
    live_segments,
    remove_sealed,
    shm_files,
    spawn_daemon,
    stop_daemon,
    wait_serving,
    write_config,
)
from tensorferry.devtools.soak_report import Report
from tensorferry.devtools.soak_setup import BUCKET, CHUNK
from tensorferry.v1 import tensorferry_pb2 as pb

# Faults must be survivable: a read timeout under the stall the proxy injects past it, and
# attempts enough that 6 faults in a row on one range (rate**6) never happen by chance.
S3_CONFIG = (
    f'chunk_size = "{CHUNK >> 10}KiB"\nconcurrency = 8\nread_timeout = 1.0\n'
    "connect_timeout = 2.0\nattempts = 6\nretry_budget = 32\n"
)
#: Seconds SIGTERM waits for leases: short, so the shutdown check ends them.
SHUTDOWN_GRACE = 1.0


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment less host credentials and proxies (the soak stays on loopback)."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("AWS_", "TENSORFERRY_"))
        and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    }  # fmt: skip
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return {**env, **(extra or {})}


class SoakDaemon:
    def __init__(
        self, workdir: Path, env: dict[str, str], *, fetch_workers: int | None = None
    ) -> None:
        self.workdir, self.env = workdir, env
        self.socket = workdir / "tf.sock"
        fetch = f"[fetch]\nworkers = {fetch_workers}\n" if fetch_workers is not None else ""
        self.config = write_config(
            workdir, [f"s3://{BUCKET}/"], prelude=f"shutdown_grace = {SHUTDOWN_GRACE}\n",
            s3=S3_CONFIG, extra=fetch,
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.instances: list[str] = []
        self.logs: list[Path] = []
        self.lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> pb.StatusResponse:
        log = self.workdir / f"daemon-{len(self.procs) + 1}.log"
        proc = spawn_daemon(self.config, self.socket, self.env, log=log)
        self.procs.append(proc)
        self.logs.append(log)
        status = wait_serving(proc, self.socket, timeout=60, log=log)
        with self.lock:
            self.proc = proc
        self.instances.append(status.instance_id)
        return status

    def kill(self) -> list[str]:
        """SIGKILL to the process group; the arenas it leaves (its successor sweeps them)."""
        assert self.proc is not None
        with self.lock:
            proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return live_segments(self.instances[-1])

    def stop(self) -> int | None:
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return None
        stop_daemon(proc, timeout=60)
        return proc.returncode

    def status(self) -> pb.StatusResponse | None:
        if not self.up:
            return None
        with contextlib.suppress(TensorferryError), Client(self.socket) as client:
            return client.status()
        return None

    def rss_anon_mib(self) -> float | None:
        proc = self.proc
        if proc is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return None


class Monitor(threading.Thread):
    """Status twice a second: how long models stay `loading`, and the daemon's RssAnon."""

    def __init__(self, daemon: SoakDaemon, report: Report, stuck_after: float) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.d, self.report, self.stuck_after = daemon, report, stuck_after
        self.stop = threading.Event()
        self.loading_since: dict[str, float] = {}
        self.stuck: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            status = self.d.status()
            rss = self.d.rss_anon_mib()
            if rss is not None:
                self.report.rss_anon_mib.append(rss)
            if status is None:
                self.loading_since.clear()  # a killed daemon's models are gone
                continue
            self.observe(status, time.monotonic())

    def observe(self, status: pb.StatusResponse, now: float) -> None:
        loading = {f"{status.instance_id}/{m.model_id}": m for m in status.models
                   if m.state == "loading"}  # fmt: skip
        for key in list(self.loading_since):
            if key not in loading:
                del self.loading_since[key]
        for key, m in loading.items():
            since = self.loading_since.setdefault(key, now)
            if now - since > self.report.longest_loading:
                self.report.longest_loading = now - since
                self.report.longest_loading_model = f"({m.uri}, {m.waiting} waiting)"
            if now - since > self.stuck_after and key not in self.stuck:
                self.stuck.add(key)
                self.report.problems.append(
                    f"model {m.model_id} ({m.uri}) `loading` for over {self.stuck_after:.0f} s "
                    f"with {m.waiting} waiting (issue 25 defect 6?)"
                )


def settle(daemon: SoakDaemon, report: Report, timeout: float = 20.0) -> None:
    """Once every worker has exited: no lease, no model loading, no busy store connection,
    and the arenas the daemon names are the ones in /dev/shm."""
    deadline = time.monotonic() + timeout
    status = daemon.status()
    while status is not None and time.monotonic() < deadline:
        busy = any(m.leases or m.state == "loading" for m in status.models)
        if not busy and status.store_connections_busy == 0:
            break
        time.sleep(0.1)
        status = daemon.status()
    if status is None:
        report.problems.append("the daemon did not answer Status after the workers exited")
        return
    report.retries = sum(r.retries for r in status.recent_loads)
    for m in status.models:
        if m.state == "loading":
            report.problems.append(
                f"model {m.model_id} ({m.uri}) still `loading` with {m.waiting} waiting after "
                f"every worker exited (issue 25 defect 6?)"
            )
        if m.leases:
            report.problems.append(f"leak: {m.leases} leases on {m.model_id} after the workers "
                                   f"exited: {list(m.lease_clients)}")  # fmt: skip
    if status.store_connections_busy:
        report.problems.append(f"leak: {status.store_connections_busy} store connections busy")
    on_disk = live_segments(status.instance_id)
    if sorted(status.arenas) != on_disk:
        report.problems.append(
            f"leak: arenas named by the daemon {sorted(status.arenas)} != in /dev/shm {on_disk}"
        )


def check_leftovers(daemon: SoakDaemon, report: Report) -> None:
    """After the daemon stopped: no file of any of its instances in /dev/shm but the
    sealed arenas the last one left for a successor, no socket, no process left in its
    groups."""
    if daemon.instances:
        remove_sealed(daemon.instances[-1])
    for instance in daemon.instances:
        if left := shm_files(instance):
            report.problems.append(f"leak: instance {instance} left {left} in /dev/shm")
    # The socket's .lock stays: a daemon that left sealed arenas may start again.
    for suffix in ("", ".peer"):
        path = daemon.socket.with_name(daemon.socket.name + suffix)
        if path.exists():
            report.problems.append(f"leak: {path} is left")
    for proc in daemon.procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            report.problems.append(f"leak: the daemon's process group {proc.pid} is alive")


def check_processes(report: Report, workdir: Path) -> None:
    """No process of the soak's is left (daemons, workers, SeaweedFS all ran in workdir)."""
    me = str(os.getpid())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == me:
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(workdir) in cmdline:
                report.problems.append(f"leak: process {proc.name} is left: {cmdline[:200]}")


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
