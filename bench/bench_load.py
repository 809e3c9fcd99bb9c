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


def cpu_split(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds of a process tree, and its minor page faults."""
    proc = psutil.Process(pid)
    user = system = 0.0
    faults = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, OSError):
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
            # Field 10 of /proc/PID/stat (minflt); the name before ")" may hold spaces.
            faults += int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    return user, system, faults


def tree_cpu(pid: int) -> float:
    user, system, _ = cpu_split(pid)
    return user + system


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
    """Generate (or reuse) the model and upload it unless it is there; prefix, keys, bytes."""
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
    shards_ = [f for f in files if f.suffix == ".safetensors"]
    return prefix, [prefix + f.name for f in shards_], sum(f.stat().st_size for f in shards_)


def curl_config(s3: S3Server, keys: list[str], path: Path) -> None:
    """A curl -K file with one group (url, range, output) per 8 MiB range."""
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
                f'url = "{url}"\nrange = "{start}-{end}"\noutput = "/dev/null"\n'
                "fail\nsilent\nshow-error\n"
                'write-out = "%{http_code} %{size_download}\\n"\n'
            )
    # Without "next" between groups, the last range would apply to every URL.
    path.write_text("next\n".join(groups))


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


def shm_files(instance: str, *, lock: bool = True) -> list[str]:
    """This daemon's live arenas (plus its lock file when ``lock``).

    Only this daemon's: other tensorferry work (tests) may share /dev/shm. Freed arenas the
    daemon keeps for reuse (".freeN") are not live; they go when the daemon stops.
    """
    names = sorted(p.name for p in SHM.glob(f"tensorferry.{instance}.*"))
    return [n for n in names if (lock or not n.endswith(".lock")) and ".free" not in n]


@dataclasses.dataclass
class Contenders:
    s3: S3Server
    env: dict[str, str]
    work: Path
    keys: list[str]
    uri: str
    object_bytes: int
    daemon_pid: int = 0
    instance: str = ""

    def ceiling(self) -> Sample:
        cfg = self.work / "curl.cfg"
        cpu0, srv0, t0 = children_cpu(), tree_cpu(self.s3.pid), time.monotonic()
        out = subprocess.run(
            ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", "32",
             "-K", str(cfg)],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        seconds = time.monotonic() - t0
        cpu, srv = children_cpu() - cpu0, tree_cpu(self.s3.pid) - srv0
        answers = [line.split() for line in out.stdout.splitlines()]
        got = sum(int(size) for _, size in answers)
        if out.returncode or got != self.object_bytes or any(c != "206" for c, _ in answers):
            raise RuntimeError(f"curl: rc {out.returncode}, {got} bytes: {out.stderr[-2000:]}")
        return Sample(seconds, got, cpu, srv, {"ranges": len(answers)})

    def tensorferry(self) -> Sample:
        socket = self.env["TENSORFERRY_SOCKET"]
        d0, srv0 = cpu_split(self.daemon_pid), tree_cpu(self.s3.pid)
        with PeakMemory(self.daemon_pid) as mem:
            r = run_worker(["tensorferry", self.uri], self.env)
        d1, srv = cpu_split(self.daemon_pid), tree_cpu(self.s3.pid) - srv0
        user, system, faults = (b - a for a, b in zip(d0, d1, strict=True))
        if r["attached"]:
            raise RuntimeError("the model was still resident: not a cold load")
        with Client(socket) as client:
            record = MessageToDict(client.status().recent_loads[-1])
            # The worker's exit ends its lease asynchronously; the arena goes after both.
            client.evict(r["model_id"])
            deadline = time.monotonic() + 30
            while client.list() or shm_files(self.instance, lock=False):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.uri} still resident 30 s after evict")
                time.sleep(0.02)
        extra = {
            "worker": r, "daemon_load": record, "peak_kib": mem.peak,
            "daemon_user_s": user, "daemon_system_s": system, "daemon_minflt": faults,
        }  # fmt: skip
        return Sample(r["seconds"], r["bytes"], user + system, srv, extra)

    def boto3(self) -> Sample:
        downloads = self.work / "downloads"
        downloads.mkdir(exist_ok=True)
        srv0 = tree_cpu(self.s3.pid)
        try:
            r = run_worker(["boto3", BUCKET, str(downloads), *self.keys], self.env)
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
        srv = tree_cpu(self.s3.pid) - srv0
        return Sample(r.pop("seconds"), r.pop("bytes"), r.pop("cpu_s"), srv, r)


def summarize(samples: list[Sample]) -> dict[str, float]:
    gbps = [s.gbps for s in samples]
    return {
        "gbps_median": statistics.median(gbps),
        "gbps_min": min(gbps),
        "gbps_max": max(gbps),
        "cpu_s_per_gb": statistics.median(s.cpu_s / (s.bytes / 1e9) for s in samples),
        "server_cpu_s_per_gb": statistics.median(s.server_cpu_s / (s.bytes / 1e9) for s in samples),
    }


def tensorferry_details(warmup: Sample, runs: list[Sample], idle: dict[str, int]) -> dict[str, Any]:
    keys = ("planSeconds", "firstByteSeconds", "fetchSeconds", "totalSeconds")
    median = {k: statistics.median(s.extra["daemon_load"].get(k, 0.0) for s in runs) for k in keys}
    median["worker_seconds"] = statistics.median(s.seconds for s in runs)
    for k in ("daemon_user_s", "daemon_system_s", "daemon_minflt"):
        median[k] = statistics.median(s.extra[k] for s in runs)
    peak = {k: max(s.extra["peak_kib"][k] for s in runs) for k in PeakMemory.FIELDS}
    return {"warmup": warmup.as_dict(), "median": median, "peak_kib": peak, "idle_kib": idle}


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
    w, m = tf["warmup"], tf["median"]
    peak, idle = tf["peak_kib"], tf["idle_kib"]
    print(
        f"\ntensorferry / ceiling = {t / ceiling:.2f}   "
        f"tensorferry / boto3 = {t / summary['boto3']['gbps_median']:.2f}\n"
        f"tensorferry first (warm-up) load: {w['gbps']:.2f} GB/s, "
        f"{w['cpu_s'] / (w['bytes'] / 1e9):.2f} CPU-s/GB (the first arena this daemon fills)\n"
        f"daemon phases (median): plan {m['planSeconds']:.2f} s, first range done "
        f"{m['firstByteSeconds']:.2f} s, fetch {m['fetchSeconds']:.2f} s, total "
        f"{m['totalSeconds']:.2f} s; the worker sees {m['worker_seconds']:.2f} s\n"
        f"daemon CPU (median): user {m['daemon_user_s']:.2f} s, system "
        f"{m['daemon_system_s']:.2f} s, {m['daemon_minflt'] / 1e3:.0f}k minor page faults\n"
        f"daemon memory: peak RssAnon {peak['RssAnon'] / 1024:.0f} MiB (idle "
        f"{idle['RssAnon'] / 1024:.0f}), peak VmRSS {peak['VmRSS'] / 1024:.0f} MiB "
        f"(RssShmem {peak['RssShmem'] / 1024:.0f} MiB of it)"
    )


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with run_seaweed(work / "seaweed") as s3:
        prefix, keys, object_bytes = prepare(work, s3, args.size_mib, args.shards)
        env = {**os.environ, **s3.env(), "TENSORFERRY_SOCKET": str(work / "tf.sock")}
        curl_config(s3, keys, work / "curl.cfg")  # fresh keys each start: sign anew
        c = Contenders(s3, env, work, keys, f"s3://{BUCKET}/{prefix}", object_bytes)
        with tensorferry_daemon(work, env) as daemon, Client(env["TENSORFERRY_SOCKET"]) as tfc:
            c.daemon_pid, c.instance = daemon.pid, tfc.status().instance_id
            idle = PeakMemory(daemon.pid)
            idle.sample()
            contenders: dict[str, Callable[[], Sample]] = {
                "ceiling": c.ceiling, "tensorferry": c.tensorferry, "boto3": c.boto3,
            }  # fmt: skip
            warmups: dict[str, Sample] = {}
            runs: dict[str, list[Sample]] = {name: [] for name in contenders}
            for name, fn in contenders.items():
                warmups[name] = s = fn()
                print(f"    warm-up {name:<12} {s.gbps:5.2f} GB/s, {s.seconds:5.2f} s", flush=True)
            # Interleaved rounds: a burst of other load on the machine hits every contender.
            for i in range(args.runs):
                for name, fn in contenders.items():
                    runs[name].append(s := fn())
                    print(f"    run {i + 1} {name:<14} {s.gbps:5.2f} GB/s", flush=True)
    if stray := shm_files(c.instance):
        raise RuntimeError(f"/dev/shm files left behind by the daemon: {stray}")
    summary = {name: summarize(samples) for name, samples in runs.items()}
    details = tensorferry_details(warmups["tensorferry"], runs["tensorferry"], idle.peak)
    report(summary, details)
    return {
        "config": {"size_mib": args.size_mib, "shards": args.shards, "runs": args.runs,
                   "object_bytes": object_bytes, "uri": c.uri, "cpus": os.cpu_count(),
                   "daemon_instance": c.instance},
        "summary": summary,
        "tensorferry": details,
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
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Everything is stopped by now: the finally blocks and context managers ran.
        sys.exit(130)
