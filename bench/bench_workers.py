"""Fetch workers: the daemon's CPU per GB and GB/s with its GETs on K workers, processes or
threads, against the same daemon with every GET on its one event loop.

One SeaweedFS on loopback (plain HTTP, or its own TLS with --tls), one model; for each
configuration a fresh daemon preloads the model (a warm-up, discarded: it pays for fresh
arena pages), then --runs times evicts and preloads it again into the recycled arena.
Measured per run: wall time, the CPU seconds of the whole daemon (its process and every
worker process: /proc of the tree), and from Status each worker's bytes, GETs and CPU.

Usage: .venv/bin/python bench/bench_workers.py [--size 768MiB] [--runs 3] [--tls]
       [--configs off,process:1,process:2,thread:1,thread:2] [--json FILE]
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
from typing import Any

from _measure import cpu_split

from tensorferry.client import Client
from tensorferry.daemon.config.values import parse_size
from tensorferry.devtools.daemon import spawn_daemon, stop_daemon, wait_serving, write_config
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server, run_seaweed
from tensorferry.devtools.tls_store import run_seaweed_tls

BUCKET = "bench"


@contextlib.contextmanager
def store(work: Path, tls: bool) -> Iterator[tuple[S3Server, dict[str, str]]]:
    """(the server to upload through, the daemon's store environment)."""
    if not tls:
        with run_seaweed(work / "seaweed") as s3:
            yield s3, s3.env()
        return
    with run_seaweed_tls(work / "seaweed") as tls_store:
        env = {**tls_store.server.env(), "AWS_CA_BUNDLE": str(tls_store.ca)}
        yield tls_store.plain, env


def measure(work: Path, env: dict[str, str], uri: str, config: str, runs: int) -> dict[str, Any]:
    mode, _, count = config.partition(":")
    fetch = f'workers = {count or 1}\nworker_mode = "{mode}"'
    conf = write_config(work, [uri], s3='chunk_size = "8MiB"', extra=f"[fetch]\n{fetch}\n")
    socket, log = work / f"tf-{mode}{count}.sock", work / f"daemon-{mode}{count}.log"
    proc = spawn_daemon(conf, socket, {**os.environ, **env}, log=log)
    try:
        wait_serving(proc, socket, log=log)
        with Client(socket) as client:
            client.preload(uri)  # warm-up: fresh arena pages, workers' first connections
            samples: list[dict[str, Any]] = []
            for _ in range(runs):
                client.evict(uri)
                before = client.status().fetch_workers
                user, system, _ = cpu_split(proc.pid)
                t0 = time.perf_counter()
                client.preload(uri)
                seconds = time.perf_counter() - t0
                user2, system2, _ = cpu_split(proc.pid)
                status = client.status()
                record = status.recent_loads[-1]
                gb = record.bytes / 1e9
                workers = [
                    {
                        "bytes_share": (w.bytes - b.bytes) / record.bytes,
                        "gets": w.gets - b.gets,
                        "cpu_s_per_gb": (w.cpu_seconds - b.cpu_seconds) / gb,
                    }
                    for w, b in zip(status.fetch_workers, before, strict=True)
                ]
                samples.append({
                    "gbps": gb / seconds,
                    "cpu_s_per_gb": (user2 + system2 - user - system) / gb,
                    "workers": workers,
                })  # fmt: skip
    finally:
        stop_daemon(proc)
    best = sorted(samples, key=lambda s: s["cpu_s_per_gb"])[len(samples) // 2]
    return {
        "config": config,
        "gbps": statistics.median(s["gbps"] for s in samples),
        "cpu_s_per_gb": statistics.median(s["cpu_s_per_gb"] for s in samples),
        "cpu_s_per_gb_all": [round(s["cpu_s_per_gb"], 3) for s in samples],
        "workers": best["workers"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="768MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="the store over https")
    parser.add_argument("--configs", default="off,process:1,process:2,thread:1,thread:2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = parse_size(args.size, "--size")
    results = []
    with tempfile.TemporaryDirectory(prefix="tf-workers-", dir="/tmp") as tmp:
        work = Path(tmp)
        write_model(work / "m", size, shards=2)
        with store(work, args.tls) as (s3, env):
            s3.create_bucket(BUCKET)
            for path in sorted((work / "m").iterdir()):
                s3.client().upload_file(str(path), BUCKET, f"m/{path.name}")
            uri = f"s3://{BUCKET}/m/"
            print(f"{'https' if args.tls else 'http'} on loopback, {size / 2**20:.0f} MiB, "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
            for config in args.configs.split(","):
                r = measure(work, env, uri, config, args.runs)
                results.append(r)
                per = "  ".join(
                    f"w{i}: {w['bytes_share']:.0%} {w['gets']} GETs {w['cpu_s_per_gb']:.2f}"
                    for i, w in enumerate(r["workers"])
                )
                print(f"{config:<10} {r['gbps']:6.2f} GB/s  {r['cpu_s_per_gb']:5.2f} CPU-s/GB "
                      f"(runs {r['cpu_s_per_gb_all']})  {per}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
