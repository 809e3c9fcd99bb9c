"""Warm attach: from Client() (torch already imported) to tensors ready, in fresh processes.

A model of ~300 tensors is made resident once; then each of --runs fresh worker processes
imports torch, starts a timer, creates a Client, loads the resident model (an attach: no
fetch) and stops the timer once every tensor view exists. Prints p50/p99/max in ms.

Usage: .venv/bin/python bench/bench_attach.py [--runs 50] [--tensors 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tensorferry.client import Client
from tensorferry.devtools.daemon import daemon_subprocess
from tensorferry.devtools.seaweed import run_seaweed

WORKER = """
import gc, json, sys, time
import torch  # imported before the clock starts, as in a real worker
from tensorferry.client import Client
# A fresh process that just imported torch owes Python's first full garbage collection
# (~80 ms here); a real worker pays it during its own start-up, so it is paid before the
# clock. Run with --no-settle to see the figure with it.
if sys.argv[2] == "settle":
    gc.collect()
t0 = time.perf_counter()
with Client() as client:
    t1 = time.perf_counter()
    with client.load(sys.argv[1]) as model:
        n = len(model.tensors)
        ms = (time.perf_counter() - t0) * 1e3
print(json.dumps({"ms": ms, "client_ms": (t1 - t0) * 1e3, "tensors": n,
                  "attached": model.attached, "daemon_ms": model.seconds * 1e3}))
"""


def write_model(directory: Path, tensors: int) -> None:
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    layers = {f"layers.{i}.weight": torch.randn(256, 256, generator=gen) for i in range(tensors)}
    save_file(layers, str(directory / "model.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--no-settle", action="store_true", help="no gc.collect() first")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    settle = "no" if args.no_settle else "settle"
    with tempfile.TemporaryDirectory(prefix="tf-attach-", dir="/tmp") as tmp:
        work = Path(tmp)
        write_model(work / "m", args.tensors)
        with run_seaweed(work / "seaweed") as s3:
            s3.create_bucket("bench")
            s3.client().upload_file(
                str(work / "m" / "model.safetensors"), "bench", "m/model.safetensors"
            )
            # The daemon logs to a file, not this terminal: the bench prints only figures.
            with daemon_subprocess(work, s3, ["s3://bench/"], log=work / "daemon.log") as daemon:
                with Client(daemon.socket) as client:
                    client.preload("s3://bench/m/")
                times: list[float] = []
                parts: list[tuple[float, float]] = []
                for _ in range(args.runs):
                    out = subprocess.run(
                        [sys.executable, "-c", WORKER, "s3://bench/m/", settle], env=daemon.env,
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    result = json.loads(out.stdout)
                    assert result["attached"]
                    assert result["tensors"] == args.tensors
                    times.append(result["ms"])
                    parts.append((result["client_ms"], result["daemon_ms"]))
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    p50 = statistics.median(times)
    client_ms = statistics.median(p[0] for p in parts)
    daemon_ms = statistics.median(p[1] for p in parts)
    print(f"median: Client() {client_ms:.1f} ms; the daemon's own time to ready {daemon_ms:.1f} ms")
    print(
        f"warm attach of {args.tensors} tensors, {args.runs} fresh processes: "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {times[-1]:.1f} ms"
    )
    if args.json:
        figures = {"runs": args.runs, "tensors": args.tensors, "settle": not args.no_settle,
                   "p50_ms": p50, "p99_ms": p99, "max_ms": times[-1], "client_ms": client_ms,
                   "daemon_ms": daemon_ms, "ms": times}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
