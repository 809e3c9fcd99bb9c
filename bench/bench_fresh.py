"""A fresh daemon's first load against a recycled load of the same model (issue #26).

One SeaweedFS on loopback (plain HTTP) and one generated model (default 1 GiB, one shard).
Each round starts a daemon per mode, loads the model from a fresh worker process (the
daemon's first load: a fresh arena), evicts it and loads it again (its arena recycled),
then stops the daemon. Rounds interleave the modes so that noise from other work on the
machine hits each alike; the table shows medians.

Modes:
  reserve-first  the whole arena fallocated and populated before the first GET, as before
                 issue #26 (the private switch TENSORFERRY_RESERVE_FIRST=1)
  alongside      the arena reserved region by region alongside the fetch (the default)
  warm           [limits] warm_bytes = the arena's size, the load once the pool is populated
  warm-now       the same, the load right after READY (it takes the pool as populated so far)

GB = 1e9 bytes. GB/s is the worker's (Client().load() to the tensors). CPU-s/GB is the
daemon's; the stages are the daemon's load record (seconds from the request's arrival).

Usage: .venv/bin/python bench/bench_fresh.py [--size-mib 1024] [--runs 3]
           [--modes reserve-first,alongside,warm,warm-now] [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _contenders import Contenders, upload_model
from _measure import Sample

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess
from tensorferry.devtools.seaweed import S3Server, run_seaweed

MODES = ("reserve-first", "alongside", "warm", "warm-now")
STAGES = ("planSeconds", "arenaSeconds", "firstByteSeconds", "fetchSeconds", "totalSeconds")


def rss_shmem(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def daemon(work: Path, s3: S3Server, mode: str, warm: int) -> Iterator[Contenders]:
    """A fresh daemon in ``mode``; the Contenders that load through it."""
    config = '[memory]\nrecycle = "8GiB"\n'
    if mode.startswith("warm"):
        config += f"[limits]\nwarm_bytes = {warm}\n"
    saved = os.environ.get("TENSORFERRY_RESERVE_FIRST")
    os.environ["TENSORFERRY_RESERVE_FIRST"] = "1" if mode == "reserve-first" else "0"
    workdir = Path(tempfile.mkdtemp(prefix="tf-fresh-", dir="/tmp"))
    try:
        with daemon_subprocess(
            workdir, s3, ["s3://bench/"], extra_config=config, log=workdir / "daemon.log"
        ) as d:
            with Client(d.socket) as client:
                instance = client.status().instance_id
            c = Contenders(s3, d.env, work, d.proc.pid, instance)
            if mode == "warm":
                deadline = time.monotonic() + 120
                while rss_shmem(d.proc.pid) < warm:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the warm pool was not populated within 120 s")
                    time.sleep(0.05)
            yield c
    finally:
        if saved is None:
            del os.environ["TENSORFERRY_RESERVE_FIRST"]
        else:
            os.environ["TENSORFERRY_RESERVE_FIRST"] = saved


def row(s: Sample) -> dict[str, float]:
    record = s.extra["daemon_load"]
    return {
        "gbps": s.gbps, "cpu_per_gb": s.cpu_per_gb, "seconds": s.seconds,
        **{k: float(record.get(k, 0.0)) for k in STAGES},
    }  # fmt: skip


def median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def table(result: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"\n{'mode':<14} {'load':<9} {'GB/s':>5} {'CPU-s/GB':>8} {'plan':>5} {'arena':>5} "
          f"{'1st B':>5} {'fetch':>5} {'total':>5}")  # fmt: skip
    for mode, loads in result.items():
        for which, m in loads.items():
            print(
                f"{mode:<14} {which:<9} {m['gbps']:5.2f} {m['cpu_per_gb']:8.2f} "
                f"{m['planSeconds']:5.2f} {m['arenaSeconds']:5.2f} "
                f"{m['firstByteSeconds']:5.2f} {m['fetchSeconds']:5.2f} {m['totalSeconds']:5.2f}"
            )
    print()
    for mode, loads in result.items():
        ratio = loads["first"]["gbps"] / loads["recycled"]["gbps"]
        print(f"{mode:<14} first / recycled GB/s = {ratio:.2f} (goal >= 0.8)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tf-bench-fresh-"))
    work.mkdir(parents=True, exist_ok=True)
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        m: {"first": [], "recycled": []} for m in modes
    }
    with run_seaweed(work / "seaweed") as s3:
        keys, nbytes = upload_model(work, s3, args.size_mib, 1)
        # The arena: the data of the shard, page-rounded; the pool is sized to take it.
        warm = (nbytes + (64 << 20)) & ~4095
        busy = os.getloadavg()[0]
        print(f"==> {nbytes / 1e9:.2f} GB, {args.runs} rounds of {', '.join(modes)}; "
              f"load average {busy:.2f} on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
        for i in range(args.runs):
            for mode in modes:
                with daemon(work, s3, mode, warm) as c:
                    first = c.tensorferry(keys, nbytes)
                    recycled = c.tensorferry(keys, nbytes)
                samples[mode]["first"].append(row(first))
                samples[mode]["recycled"].append(row(recycled))
                print(f"    round {i + 1} {mode:<14} first {first.gbps:5.2f} GB/s, recycled "
                      f"{recycled.gbps:5.2f} GB/s", flush=True)  # fmt: skip
    result = {m: {k: median(v) for k, v in loads.items()} for m, loads in samples.items()}
    table(result)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"median": result, "runs": samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
