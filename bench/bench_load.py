"""Cold-load benchmark: tensorferry vs. a curl ceiling vs. boto3 + safetensors.

One SeaweedFS on loopback and one generated model (default 2 GiB in 4 shards). Each
contender gets a warm-up run, then --runs measured runs; rounds are interleaved so that
noise from other work on the machine hits every contender alike. The table shows medians.

  ceiling      one curl process, 32 parallel 8 MiB range GETs of the shards to /dev/null
  tensorferry  the daemon, started as examples/demo.py does; per run a fresh worker process
               calls Client().load(); the model is evicted between runs, so each is cold
  boto3        a fresh process per run: download_file of each shard to a directory on
               disk, then safetensors.torch.load_file of each

GB = 1e9 bytes. CPU-s/GB is the reader's CPU (curl; the daemon's process tree; the boto3
worker); "server" is SeaweedFS's.

Usage: .venv/bin/python bench/bench_load.py [--size-mib 2048] [--shards 4] [--runs 3]
           [--workdir DIR] [--json /tmp/bench_load.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from google.protobuf.json_format import MessageToDict

from tensorferry.client import Client
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server, run_seaweed

WORKER = Path(__file__).resolve().with_name("_worker.py")
BUCKET = "bench"
RANGE = 8 << 20
SHM = Path("/dev/shm")


@dataclasses.dataclass
class Sample:
    seconds: float
    bytes: int
    cpu_s: float  # the reader's CPU
    server_cpu_s: float  # SeaweedFS's CPU over the same window
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gbps": self.gbps}


def tree_cpu(pid: int) -> float:
    return sum(tree_cpu_split(pid)[:2])


def tree_cpu_split(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds of a process tree, and its minor page faults."""
    proc = psutil.Process(pid)
    user = system = 0.0
    faults = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, OSError):
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
            # /proc/PID/stat field 10 (minflt), counted after the parenthesised name.
            faults += int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    return user, system, faults


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class PeakMemory(threading.Thread):
    """Peak RssAnon / VmRSS / RssShmem (KiB) of one process, sampled every 20 ms."""

    FIELDS = ("RssAnon", "VmRSS", "RssShmem")

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._done = threading.Event()

    def sample(self) -> None:
        for line in self.path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]))

    def run(self) -> None:
        while not self._done.wait(0.02):
            with contextlib.suppress(OSError):
                self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
        self.sample()


def run_worker(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def prepare(work: Path, s3: S3Server, size_mib: int, shards: int) -> tuple[str, list[str], int]:
    """Generate (or reuse) the model and upload (or reuse) it; returns prefix, keys, bytes."""
    name = f"model-{size_mib}mib-{shards}s"
    model_dir = work / name
    if not (model_dir / ".complete").exists():
        shutil.rmtree(model_dir, ignore_errors=True)
        t0 = time.monotonic()
        write_model(model_dir, size_mib << 20, shards=shards)
        (model_dir / ".complete").touch()
        print(f"==> generated {model_dir} in {time.monotonic() - t0:.1f} s", flush=True)
    files = sorted(p for p in model_dir.iterdir() if not p.name.startswith("."))
    prefix = f"{name}/"
    s3.create_bucket(BUCKET)
    client = s3.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    have = {o["Key"]: o["Size"] for o in listed}
    t0 = time.monotonic()
    for f in files:
        if have.get(prefix + f.name) != f.stat().st_size:
            client.upload_file(str(f), BUCKET, prefix + f.name)
    print(f"==> s3://{BUCKET}/{prefix} ready ({time.monotonic() - t0:.1f} s upload)", flush=True)
    shard_files = [f for f in files if f.suffix == ".safetensors"]
    keys = [prefix + f.name for f in shard_files]
    return prefix, keys, sum(f.stat().st_size for f in shard_files)


def curl_config(s3: S3Server, keys: list[str], path: Path) -> int:
    """One curl config group per 8 MiB range; returns the number of ranges."""
    client = s3.client()
    groups = []
    for key in keys:
        size = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=12 * 3600
        )
        for start in range(0, size, RANGE):
            end = min(start + RANGE, size) - 1
            groups.append(
                f'url = "{url}"\nrange = "{start}-{end}"\noutput = "/dev/null"\nfail\n'
                'write-out = "%{http_code} %{size_download}\\n"\n'
            )
    path.write_text("next\n".join(groups))
    return len(groups)


@contextlib.contextmanager
def tensorferry_daemon(work: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    config = work / "tensorferry.toml"
    config.write_text(f'[sources]\nallow = ["s3://{BUCKET}/"]\n[s3]\naddressing_style = "path"\n')
    socket = Path(env["TENSORFERRY_SOCKET"])
    with open(work / "daemon.log", "ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "tensorferry", "serve", "--config", str(config)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start; see {work / 'daemon.log'}")
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def evict_and_wait(socket: str, model_id: str, instance: str) -> None:
    # The worker's exit ends its lease asynchronously; the arena goes once both are done.
    with Client(socket) as client:
        client.evict(model_id)
        deadline = time.monotonic() + 30
        while client.list() or our_segments(instance):
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {model_id} still resident 30 s after evict")
            time.sleep(0.02)


def our_segments(instance: str) -> list[str]:
    # Only this daemon's: other tensorferry work (tests) may share /dev/shm.
    return [p.name for p in SHM.glob(f"tensorferry.{instance}.*") if p.suffix != ".lock"]


def summarize(samples: list[Sample]) -> dict[str, float]:
    gbps = [s.gbps for s in samples]
    return {
        "gbps_median": statistics.median(gbps),
        "gbps_min": min(gbps),
        "gbps_max": max(gbps),
        "cpu_s_per_gb": statistics.median(s.cpu_s / (s.bytes / 1e9) for s in samples),
        "server_cpu_s_per_gb": statistics.median(s.server_cpu_s / (s.bytes / 1e9) for s in samples),
    }


def report(summary: dict[str, dict[str, float]], tf: dict[str, Any]) -> None:
    ceiling = summary["ceiling"]["gbps_median"]
    print(
        f"\n{'contender':<12} {'GB/s':>6} {'min':>6} {'max':>6} {'CPU-s/GB':>9} "
        f"{'server CPU-s/GB':>16} {'x ceiling':>10}"
    )
    for name, s in summary.items():
        print(
            f"{name:<12} {s['gbps_median']:6.2f} {s['gbps_min']:6.2f} {s['gbps_max']:6.2f} "
            f"{s['cpu_s_per_gb']:9.2f} {s['server_cpu_s_per_gb']:16.2f} "
            f"{s['gbps_median'] / ceiling:10.2f}"
        )
    t = summary["tensorferry"]["gbps_median"]
    print(
        f"\ntensorferry / ceiling = {t / ceiling:.2f}   "
        f"tensorferry / boto3 = {t / summary['boto3']['gbps_median']:.2f}"
    )
    w = tf["warmup"]
    print(
        f"tensorferry first (warm-up) load: {w['gbps']:.2f} GB/s, "
        f"{w['cpu_s'] / (w['bytes'] / 1e9):.2f} CPU-s/GB (fresh /dev/shm pages)"
    )
    p = tf["phases_median"]
    print(
        f"daemon phases (median): plan {p['planSeconds']:.2f} s, first range done "
        f"{p['firstByteSeconds']:.2f} s, fetch {p['fetchSeconds']:.2f} s, "
        f"total {p['totalSeconds']:.2f} s; worker sees {p['worker_seconds']:.2f} s"
    )
    print(
        f"daemon CPU (median): user {p['daemon_user_s']:.2f} s, system "
        f"{p['daemon_system_s']:.2f} s, {p['daemon_minflt'] / 1e3:.0f}k minor page faults"
    )
    m, idle = tf["peak_kib"], tf["idle_kib"]
    print(
        f"daemon memory: peak RssAnon {m['RssAnon'] / 1024:.0f} MiB (idle "
        f"{idle['RssAnon'] / 1024:.0f}), peak VmRSS {m['VmRSS'] / 1024:.0f} MiB "
        f"(of which RssShmem {m['RssShmem'] / 1024:.0f} MiB)"
    )


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with run_seaweed(work / "seaweed") as s3:
        prefix, keys, object_bytes = prepare(work, s3, args.size_mib, args.shards)
        uri = f"s3://{BUCKET}/{prefix}"
        env = {**os.environ, **s3.env(), "TENSORFERRY_SOCKET": str(work / "tf.sock")}
        curl_cfg = work / "curl.cfg"
        n_ranges = curl_config(s3, keys, curl_cfg)
        downloads = work / "downloads"

        def ceiling() -> Sample:
            cpu0, srv0, t0 = children_cpu(), tree_cpu(s3.pid), time.monotonic()
            out = subprocess.run(
                ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", "32",
                 "-K", str(curl_cfg)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            seconds = time.monotonic() - t0
            cpu, srv = children_cpu() - cpu0, tree_cpu(s3.pid) - srv0
            codes = [line.split() for line in out.stdout.splitlines()]
            got = sum(int(size) for _, size in codes)
            if out.returncode or got != object_bytes or any(c != "206" for c, _ in codes):
                raise RuntimeError(f"curl: rc {out.returncode}, {got} bytes: {out.stderr[-2000:]}")
            return Sample(seconds, got, cpu, srv, {"ranges": n_ranges})

        def boto3() -> Sample:
            downloads.mkdir(exist_ok=True)
            srv0 = tree_cpu(s3.pid)
            try:
                r = run_worker(["boto3", BUCKET, str(downloads), *keys], env)
            finally:
                shutil.rmtree(downloads, ignore_errors=True)
            srv = tree_cpu(s3.pid) - srv0
            return Sample(r.pop("seconds"), r.pop("bytes"), r.pop("cpu_s"), srv, r)

        with tensorferry_daemon(work, env) as daemon, Client(env["TENSORFERRY_SOCKET"]) as tfc:
            instance = tfc.status().instance_id
            idle = PeakMemory(daemon.pid)
            idle.sample()
            peak = dict.fromkeys(PeakMemory.FIELDS, 0)

            def tensorferry() -> Sample:
                d0, srv0 = tree_cpu_split(daemon.pid), tree_cpu(s3.pid)
                with PeakMemory(daemon.pid) as mem:
                    r = run_worker(["tensorferry", uri], env)
                d1, srv = tree_cpu_split(daemon.pid), tree_cpu(s3.pid) - srv0
                user, system, faults = (b - a for a, b in zip(d0, d1, strict=True))
                record = MessageToDict(tfc.status().recent_loads[-1])
                evict_and_wait(env["TENSORFERRY_SOCKET"], r["model_id"], instance)
                extra = {
                    "worker": r, "daemon_load": record, "peak_kib": mem.peak,
                    "daemon_user_s": user, "daemon_system_s": system, "daemon_minflt": faults,
                }  # fmt: skip
                return Sample(r["seconds"], r["bytes"], user + system, srv, extra)

            contenders: dict[str, Callable[[], Sample]] = {
                "ceiling": ceiling, "tensorferry": tensorferry, "boto3": boto3,
            }  # fmt: skip
            warmups: dict[str, Sample] = {}
            runs: dict[str, list[Sample]] = {name: [] for name in contenders}
            for name, fn in contenders.items():
                warmups[name] = s = fn()
                print(
                    f"    warm-up {name:<12} {s.gbps:5.2f} GB/s in {s.seconds:5.2f} s", flush=True
                )
            for i in range(args.runs):
                for name, fn in contenders.items():
                    runs[name].append(s := fn())
                    print(f"    run {i + 1} {name:<14} {s.gbps:5.2f} GB/s", flush=True)
            tf_runs = runs["tensorferry"]
            for s in tf_runs:
                for k in peak:
                    peak[k] = max(peak[k], s.extra["peak_kib"][k])
            if leftover := our_segments(instance):
                raise RuntimeError(f"segments left while the daemon runs: {leftover}")
    if leftover := list(SHM.glob(f"tensorferry.{instance}.*")):
        raise RuntimeError(f"/dev/shm files left behind: {leftover}")
    phases = {
        k: statistics.median(s.extra["daemon_load"].get(k, 0.0) for s in tf_runs)
        for k in ("planSeconds", "firstByteSeconds", "fetchSeconds", "totalSeconds")
    }
    phases["worker_seconds"] = statistics.median(s.seconds for s in tf_runs)
    for k in ("daemon_user_s", "daemon_system_s", "daemon_minflt"):
        phases[k] = statistics.median(s.extra[k] for s in tf_runs)
    tf_info = {
        "warmup": warmups["tensorferry"].as_dict(),
        "phases_median": phases,
        "peak_kib": peak,
        "idle_kib": idle.peak,
        "instance": instance,
    }
    summary = {name: summarize(samples) for name, samples in runs.items()}
    report(summary, tf_info)
    return {
        "config": {"size_mib": args.size_mib, "shards": args.shards, "runs": args.runs,
                   "object_bytes": object_bytes, "uri": uri, "cpus": os.cpu_count()},
        "summary": summary,
        "tensorferry": tf_info,
        "warmups": {name: s.as_dict() for name, s in warmups.items()},
        "runs": {name: [s.as_dict() for s in samples] for name, samples in runs.items()},
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep model and S3 data here across runs")
    parser.add_argument("--json", type=Path, default=Path("/tmp/bench_load.json"))
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="tf-bench-", dir="/tmp"))
            )
        else:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        result = bench(args, work)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nraw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
