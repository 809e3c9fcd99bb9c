"""The readers the load benchmark compares, each reading the same objects from one SeaweedFS.

ceiling      one curl process, 32 parallel 8 MiB range GETs of the shards to /dev/null
tensorferry  the daemon; per run a fresh worker process calls Client().load(), and the
             model is evicted afterwards, so every run is a cold load
boto3        a fresh process per run: download_file of each shard to a directory on disk,
             then safetensors.torch.load_file of each
runai-cN     a fresh process per run: Run:ai Model Streamer's SafetensorsStreamer over the
             shards' s3:// URIs, RUNAI_STREAMER_CONCURRENCY=N, every tensor kept
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _measure import LinkRate, PeakMemory, Sample, children_cpu, cpu_split, tree_cpu
from google.protobuf.json_format import MessageToDict

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server

WORKER = Path(__file__).resolve().with_name("_worker.py")
BUCKET = "bench"
RANGE = 8 << 20
SHM = Path("/dev/shm")


def run_worker(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def upload_model(work: Path, s3: S3Server, size_mib: int, shards: int) -> tuple[list[str], int]:
    """Generate (or reuse) the model and upload what is missing; its shard keys and bytes."""
    name = f"model-{size_mib}mib-{shards}s"
    model_dir = work / name
    if not (model_dir / ".complete").exists():
        shutil.rmtree(model_dir, ignore_errors=True)
        t0 = time.monotonic()
        write_model(model_dir, size_mib << 20, shards=shards)
        (model_dir / ".complete").touch()
        print(f"==> generated {model_dir} in {time.monotonic() - t0:.1f} s", flush=True)
    files = sorted(p for p in model_dir.iterdir() if not p.name.startswith("."))
    s3.create_bucket(BUCKET)
    client = s3.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{name}/").get("Contents", [])
    have = {o["Key"]: o["Size"] for o in listed}
    t0 = time.monotonic()
    for f in files:
        if have.get(f"{name}/{f.name}") != f.stat().st_size:
            client.upload_file(str(f), BUCKET, f"{name}/{f.name}")
    print(f"==> s3://{BUCKET}/{name}/ ready ({time.monotonic() - t0:.1f} s upload)", flush=True)
    shards_ = [f for f in files if f.suffix == ".safetensors"]
    return [f"{name}/{f.name}" for f in shards_], sum(f.stat().st_size for f in shards_)


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
def tensorferry_daemon(
    work: Path, s3: S3Server, recycle_mib: int
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon as examples/demo.py starts it; freed arenas up to ``recycle_mib`` are kept."""
    with daemon_subprocess(
        work, s3, [f"s3://{BUCKET}/"], extra_config=f'[memory]\nrecycle = "{recycle_mib}MiB"\n',
        log=work / "daemon.log",
    ) as daemon:  # fmt: skip
        yield daemon.proc


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
    daemon_pid: int = 0
    instance: str = ""
    signed: set[Path] = dataclasses.field(default_factory=set)

    def ceiling(self, keys: list[str], nbytes: int, parallel: int = 32) -> Sample:
        """One curl process fetching every 8 MiB range with ``parallel`` in flight."""
        cfg = self.work / f"curl-{nbytes}.cfg"
        if cfg not in self.signed:  # each SeaweedFS start has a new port and keys
            curl_config(self.s3, keys, cfg)
            self.signed.add(cfg)
        cpu0, srv0 = children_cpu(), tree_cpu(self.s3.pid)
        with LinkRate() as link:
            t0 = time.monotonic()
            out = subprocess.run(
                ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max",
                 str(parallel), "-K", str(cfg)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            seconds = time.monotonic() - t0
        cpu, srv = children_cpu() - cpu0, tree_cpu(self.s3.pid) - srv0
        answers = [line.split() for line in out.stdout.splitlines()]
        got = sum(int(size) for _, size in answers)
        if out.returncode or got != nbytes or any(c != "206" for c, _ in answers):
            raise RuntimeError(f"curl: rc {out.returncode}, {got} bytes: {out.stderr[-2000:]}")
        rate = link.series(t0, seconds, got)
        return Sample(seconds, got, cpu, srv, {"parallel": parallel, "ranges": len(answers)}, rate)

    def tensorferry(self, keys: list[str], nbytes: int) -> Sample:
        uri = f"s3://{BUCKET}/{keys[0].split('/')[0]}/"
        d0, srv0 = cpu_split(self.daemon_pid), tree_cpu(self.s3.pid)
        with PeakMemory(self.daemon_pid) as mem, LinkRate() as link:
            r = run_worker(["tensorferry", uri], self.env)
        d1, srv = cpu_split(self.daemon_pid), tree_cpu(self.s3.pid) - srv0
        user, system, faults = (b - a for a, b in zip(d0, d1, strict=True))
        if r["attached"]:
            raise RuntimeError("the model was still resident: not a cold load")
        with Client(self.env["TENSORFERRY_SOCKET"]) as client:
            record = MessageToDict(client.status().recent_loads[-1])
            # The worker's exit ends its lease asynchronously; the arena goes after both.
            client.evict(r["model_id"])
            deadline = time.monotonic() + 30
            while client.list() or shm_files(self.instance, lock=False):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{uri} still resident 30 s after evict")
                time.sleep(0.02)
        extra = {
            "worker": r, "daemon_load": record, "peak_kib": mem.peak,
            "daemon_user_s": user, "daemon_system_s": system, "daemon_minflt": faults,
        }  # fmt: skip
        rate = link.series(r["t0"], r["seconds"], r["bytes"])
        return Sample(r["seconds"], r["bytes"], user + system, srv, extra, rate)

    def boto3(self, keys: list[str], nbytes: int) -> Sample:
        downloads = self.work / "downloads"
        downloads.mkdir(exist_ok=True)
        srv0 = tree_cpu(self.s3.pid)
        try:
            with LinkRate() as link:
                r = run_worker(["boto3", BUCKET, str(downloads), *keys], self.env)
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
        srv = tree_cpu(self.s3.pid) - srv0
        rate = link.series(r["t0"], r["seconds"], r["bytes"])
        return Sample(r.pop("seconds"), r.pop("bytes"), r.pop("cpu_s"), srv, r, rate)

    def runai(self, keys: list[str], nbytes: int, concurrency: int) -> Sample:
        env = {
            **self.env,
            "RUNAI_STREAMER_CONCURRENCY": str(concurrency),
            # SeaweedFS on loopback: path-style addressing, no instance metadata service.
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
        }
        srv0 = tree_cpu(self.s3.pid)
        with LinkRate() as link:
            r = run_worker(["runai", *(f"s3://{BUCKET}/{k}" for k in keys)], env)
        srv = tree_cpu(self.s3.pid) - srv0
        rate = link.series(r["t0"], r["seconds"], r["bytes"])
        return Sample(r.pop("seconds"), r.pop("bytes"), r.pop("cpu_s"), srv, r, rate)


def runai_available() -> bool:
    try:
        import runai_model_streamer  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True
