"""Prepared vs plain cold loads of one model on one server in one run, and `prepare` speed.

One SeaweedFS on loopback and one generated model (as bench_load.py makes them). First
`tensorferry prepare` runs twice as a subprocess: S3 -> S3 and local disk -> local disk
(wall time, source GB/s, peak RSS). Then one daemon loads the plain safetensors and the
prepared artifact in turns (a warm-up round, then --runs rounds), each load cold: the
model is evicted after it and the next load waits until it is gone. The table shows
medians; GB = 1e9 bytes; CPU-s/GB is the daemon's process tree.

Usage: .venv/bin/python bench/bench_prepared.py [--size-mib 1024] [--shards 4] [--runs 3]
           [--workdir DIR] [--recycle-mib N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _contenders import BUCKET, tensorferry_daemon, upload_model
from _measure import tree_cpu

from tensorferry.client import Client
from tensorferry.devtools.seaweed import run_seaweed


def run_prepare(src: str, dst: str, env: dict[str, str], nbytes: int) -> dict[str, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorferry", "prepare", src, dst, "-q"], env=env,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    # VmHWM is the process's own peak RSS; ru_maxrss of a child would include this
    # process's RSS at fork time.
    peak_kib = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare {src} -> {dst} failed")
    seconds = time.monotonic() - t0
    return {"seconds": seconds, "gbps": nbytes / seconds / 1e9, "peak_rss_mib": peak_kib / 1024}


def cold_load(client: Client, uri: str, daemon_pid: int) -> tuple[float, int, float]:
    cpu0, t0 = tree_cpu(daemon_pid), time.monotonic()
    with client.load(uri) as model:
        seconds, nbytes = time.monotonic() - t0, model.total_bytes
    cpu = tree_cpu(daemon_pid) - cpu0
    client.evict(uri)
    deadline = time.monotonic() + 30
    while client.list() and time.monotonic() < deadline:
        time.sleep(0.02)
    return seconds, nbytes, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--recycle-mib", type=int, help="the daemon's [memory] recycle (default: 2x the model)"
    )
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tf-bench-prepared-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with run_seaweed(work / "s3") as s3:
            keys, nbytes = upload_model(work, s3, args.size_mib, args.shards)
            prefix = keys[0].split("/")[0] + "/"
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env |= s3.env() | {"TENSORFERRY_SOCKET": str(work / "tf.sock")}
            plain = f"s3://{BUCKET}/{prefix}"
            prepared = f"s3://{BUCKET}/{prefix.rstrip('/')}-prepared/"
            model_dir = work / prefix.rstrip("/")
            rows = {
                "prepare S3 -> S3": run_prepare(plain, prepared, env, nbytes),
                "prepare disk -> disk": run_prepare(
                    str(model_dir), str(work / "prepared-local"), env, nbytes
                ),
            }
            for name, r in rows.items():
                print(f"{name:22} {r['seconds']:6.2f} s {r['gbps']:6.2f} GB/s "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
            samples: dict[str, list[tuple[float, int, float]]] = {"plain": [], "prepared": []}
            with (
                tensorferry_daemon(work, s3, args.recycle_mib or 2 * args.size_mib + 128) as daemon,
                Client(env["TENSORFERRY_SOCKET"]) as client,
            ):
                for round_ in range(args.runs + 1):
                    for kind, uri in (("plain", plain), ("prepared", prepared)):
                        sample = cold_load(client, uri, daemon.pid)
                        if round_:  # the first round warms up
                            samples[kind].append(sample)
            print(f"\ncold loads of {nbytes / 1e9:.2f} GB, median of {args.runs}:")
            for kind, runs in samples.items():
                seconds = statistics.median(s for s, _, _ in runs)
                gbps = statistics.median(b / s / 1e9 for s, b, _ in runs)
                cpu = statistics.median(c / (b / 1e9) for _, b, c in runs)
                print(f"  {kind:9} {seconds:6.2f} s {gbps:6.2f} GB/s {cpu:6.2f} daemon CPU-s/GB")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
