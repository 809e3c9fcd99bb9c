"""Warm attach: from Client() (torch already imported) to tensors ready, in fresh processes.

A model of ~300 tensors is made resident once; then each of --runs fresh worker processes
imports torch, starts a timer, creates a Client, loads the resident model (an attach: no
fetch) and stops the timer once every tensor view exists. Prints p50/p99/max in ms, and
with --breakdown the median of each stage (worker marks, and the daemon's attach records).

Usage: .venv/bin/python bench/bench_attach.py [--runs 50] [--tensors 300] [--breakdown]
       [--listing-reuse S] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from tensorferry.client import Client
from tensorferry.devtools.daemon import (
    DaemonProcess,
    spawn_daemon,
    stop_daemon,
    wait_serving,
    write_config,
)
from tensorferry.devtools.seaweed import S3Server, run_seaweed

# The marks wrap the client's own steps (a few microseconds each): the figure is the same
# with or without --breakdown, which only prints them.
WORKER = """
import gc, json, sys, time
import torch  # imported before the clock starts, as in a real worker
from tensorferry.client import Client
from tensorferry.client import _client, _core, _model, _views
clock = time.perf_counter
marks = {}

def timed(module, name, key):
    inner = getattr(module, name)
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            marks[key] = marks.get(key, 0.0) + clock() - start
    setattr(module, name, wrapper)

def first_event(events):
    for event in events:
        marks.setdefault("first_event", clock())
        yield event

collect = _client.collect
def collecting(events, progress):
    marks["load_sent"] = clock()
    try:
        return collect(first_event(events), progress)
    finally:
        marks["ready"] = clock()

_client.collect = collecting
timed(_core, "peer_token", "peer_token")
timed(_model, "map_or_end", "map")
timed(_views, "build_views", "views")
# A fresh process that just imported torch owes Python's first full garbage collection
# (~80 ms here); a real worker pays it during its own start-up, so it is paid before the
# clock. Run with --no-settle to see the figure with it.
if sys.argv[2] == "settle":
    gc.collect()
t0, c0 = clock(), time.process_time()
with Client() as client:
    t1 = clock()
    with client.load(sys.argv[1]) as model:
        n = len(model.tensors)
        t2, c2 = clock(), time.process_time()
ms = (t2 - t0) * 1e3
stages = {
    "Client()": t1 - t0,
    "peer token": marks.get("peer_token", 0.0),
    "Load sent -> first event": marks["first_event"] - marks["load_sent"],
    "first event -> ready event": marks["ready"] - marks["first_event"],
    "map the arena": marks["map"],
    "build the views": marks["views"],
}
stages["rest of load()"] = (t2 - t1) - sum(v for k, v in stages.items() if k != "Client()")
print(json.dumps({"ms": ms, "cpu_ms": (c2 - c0) * 1e3, "client_ms": (t1 - t0) * 1e3,
                  "tensors": n, "attached": model.attached, "daemon_ms": model.seconds * 1e3,
                  "stages_ms": {k: v * 1e3 for k, v in stages.items()}}))
"""


def write_model(directory: Path, tensors: int) -> None:
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    layers = {f"layers.{i}.weight": torch.randn(256, 256, generator=gen) for i in range(tensors)}
    save_file(layers, str(directory / "model.safetensors"))


@contextlib.contextmanager
def serving(work: Path, s3: S3Server, listing_reuse: float) -> Iterator[DaemonProcess]:
    """`daemon_subprocess`, with ``[sources] listing_reuse`` set when it is not 0."""
    config = write_config(work, ["s3://bench/"])
    if listing_reuse:
        text = config.read_text().replace("[sources]\n", "[sources]\n"
                                          f"listing_reuse = {listing_reuse}\n", 1)  # fmt: skip
        config.write_text(text)
    socket, env = work / "tf.sock", {**os.environ, **s3.env()}
    # The daemon logs to a file, not this terminal: the bench prints only figures.
    proc = spawn_daemon(config, socket, env, log=work / "daemon.log")
    try:
        wait_serving(proc, socket, log=work / "daemon.log")
        yield DaemonProcess(socket, proc, {**env, "TENSORFERRY_SOCKET": str(socket)})
    finally:
        stop_daemon(proc)


def daemon_stages(client: Client, uri: str) -> dict[str, float]:
    """Medians (ms) of the daemon's attach records still in Status (its last 32 loads)."""
    records = [r for r in client.status().recent_loads if r.outcome == "attached" and r.uri == uri]
    if not records:
        return {}
    target = statistics.median(r.plan_seconds for r in records) * 1e3
    lease = statistics.median(r.total_seconds for r in records) * 1e3
    return {"request -> target known (listing, key)": target, "-> lease held": lease}


def breakdown(stages: list[dict[str, float]], daemon_ms: float, daemon: dict[str, float]) -> str:
    lines = ["worker side (median ms):"]
    for name in stages[0]:
        lines.append(f"  {name:<44} {statistics.median(s[name] for s in stages):7.2f}")
    lines.append("daemon side (median ms, from the request's arrival in the handler):")
    for name, value in daemon.items():
        lines.append(f"  {name:<44} {value:7.2f}")
    lines.append(f"  {'-> ready event built (Ready.seconds)':<44} {daemon_ms:7.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--no-settle", action="store_true", help="no gc.collect() first")
    parser.add_argument("--breakdown", action="store_true", help="print the median stages")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument(
        "--listing-reuse", type=float, default=0.0, metavar="S",
        help="the daemon's [sources] listing_reuse (default 0: every attach lists)",
    )  # fmt: skip
    args = parser.parse_args()
    settle = "no" if args.no_settle else "settle"
    uri = "s3://bench/m/"
    with tempfile.TemporaryDirectory(prefix="tf-attach-", dir="/tmp") as tmp:
        work = Path(tmp)
        write_model(work / "m", args.tensors)
        with run_seaweed(work / "seaweed") as s3:
            s3.create_bucket("bench")
            s3.client().upload_file(
                str(work / "m" / "model.safetensors"), "bench", "m/model.safetensors"
            )
            with serving(work, s3, args.listing_reuse) as daemon:
                with Client(daemon.socket) as client:
                    client.preload(uri)
                times: list[float] = []
                cpu: list[float] = []
                parts: list[tuple[float, float]] = []
                stages: list[dict[str, float]] = []
                for _ in range(args.runs):
                    out = subprocess.run(
                        [sys.executable, "-c", WORKER, uri, settle], env=daemon.env,
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    result = json.loads(out.stdout)
                    assert result["attached"]
                    assert result["tensors"] == args.tensors
                    times.append(result["ms"])
                    cpu.append(result["cpu_ms"])
                    parts.append((result["client_ms"], result["daemon_ms"]))
                    stages.append(result["stages_ms"])
                with Client(daemon.socket) as client:
                    daemon_parts = daemon_stages(client, uri)
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    p50 = statistics.median(times)
    client_ms = statistics.median(p[0] for p in parts)
    daemon_ms = statistics.median(p[1] for p in parts)
    if args.breakdown:
        print(breakdown(stages, daemon_ms, daemon_parts))
    print(f"median: Client() {client_ms:.1f} ms; the daemon's own time to ready {daemon_ms:.1f} ms")
    # CPU time of the worker (all its threads) over the same span: what a busy machine
    # changes least.
    print(f"median CPU time of the worker over the attach: {statistics.median(cpu):.1f} ms")
    print(
        f"warm attach of {args.tensors} tensors, {args.runs} fresh processes: "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {times[-1]:.1f} ms"
    )
    if args.json:
        figures = {"runs": args.runs, "tensors": args.tensors, "settle": not args.no_settle,
                   "listing_reuse": args.listing_reuse,
                   "p50_ms": p50, "p99_ms": p99, "max_ms": times[-1], "client_ms": client_ms,
                   "daemon_ms": daemon_ms, "ms": times, "cpu_ms": statistics.median(cpu),
                   "stages_ms": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
                   "daemon_stages_ms": daemon_parts}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
