"""`tensorferry` commands that talk to a running daemon: load, preload, files, ls, evict,
status (each takes the parsed arguments and returns the exit status)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tensorferry.errors import DaemonNotRunning, DaemonUnavailable


def progress_bar(label: str) -> Any:
    last = [0.0]
    tty = sys.stderr.isatty()

    def show(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done != total:
            return
        last[0] = now
        if total:
            pct = done / total
            bar = "#" * int(pct * 30)
            line = f"{label} {stage} [{bar:<30}] {pct:6.1%} {done / 1e9:.2f}/{total / 1e9:.2f} GB"
        else:
            line = f"{label} {stage}..."
        print(("\r" if tty else "") + line, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


def connect(args: argparse.Namespace) -> Any:
    from tensorferry.client import Client

    return Client(args.socket)


def load(args: argparse.Namespace) -> int:
    with connect(args) as client:
        t0 = time.monotonic()
        show = None if args.quiet else progress_bar(args.uri)
        with client.load(
            args.uri, args.device, timeout=args.timeout, progress=show, select=args.select,
            rank=args.rank, world_size=args.world_size,
        ) as model:  # fmt: skip
            seconds = time.monotonic() - t0
            if show is not None and sys.stderr.isatty():
                print(file=sys.stderr)
            n, size = len(model.tensors), model.total_bytes
            how = "attached to resident model" if model.attached else "loaded"
            print(
                f"{how} {model.model_id}: {n} tensors, {size / 1e9:.3f} GB in {seconds:.2f} s "
                f"({size / max(seconds, 1e-9) / 1e9:.2f} GB/s)"
            )
    return 0


def files(args: argparse.Namespace) -> int:
    from tensorferry.integrations.vllm_options import write_serve_files

    with connect(args) as client:
        names = write_serve_files(client, args.uri, Path(args.directory))
    print(f"{args.directory}: {', '.join(names)}")
    return 0


def preload(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.retry_for
    while True:
        try:
            with connect(args) as client:
                show = None if args.quiet else progress_bar(args.uri)
                if not args.wait:
                    client.preload(args.uri, args.device, timeout=args.timeout, select=args.select,
                                   rank=args.rank, world_size=args.world_size,
                                   pin=args.pin)  # fmt: skip
                    return 0
                ready = client.preload(
                    args.uri, args.device, timeout=args.timeout, progress=show, select=args.select,
                    rank=args.rank, world_size=args.world_size, pin=args.pin,
                )  # fmt: skip
                print(f"resident: {ready.model_id} ({ready.total_bytes / 1e9:.3f} GB)")
                return 0
        except (DaemonNotRunning, DaemonUnavailable) as exc:
            # Scale-out hooks often run while the daemon is still (re)starting.
            if time.monotonic() >= deadline:
                raise
            print(f"waiting for the daemon: {exc}", file=sys.stderr)
            time.sleep(1.0)


def ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        models = client.list()
    if not models:
        print("no resident models")
    for m in models:
        pinned = ("\tpinned" if m.pinned else "") + ("\tadopted" if m.adopted else "")
        print(
            f"{m.model_id}\t{m.state}\t{m.bytes / 1e9:.3f} GB\t{m.leases} leases\t{m.uri}{pinned}"
        )
    return 0


def evict(args: argparse.Namespace) -> int:
    with connect(args) as client:
        response = client.evict(args.model, f"`tensorferry evict` (pid {os.getpid()})")
    print(
        f"evicted {', '.join(response.evicted)}; {response.pending_leases} leases still open"
        + (
            f"; {response.refused_waiters} waiting loads refused"
            if response.refused_waiters
            else ""
        )
    )
    return 0


def status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with connect(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(MessageToDict(status), indent=2))
        return 0
    print(
        f"tensorferry {status.version} pid {status.pid} instance {status.instance_id} "
        f"up {status.uptime_seconds:.0f} s; resident {status.resident_bytes / 1e9:.3f} GB"
    )
    if status.adopted_models:
        print(
            f"  adopted at start: {status.adopted_models} models, "
            f"{status.adopted_bytes / 1e9:.3f} GB (resident from the daemon before, not fetched)"
        )
    for g in status.rings:
        node = f" (NUMA node {g.numa_node})" if g.numa_node >= 0 else ""
        pinned = g.slots * g.slot_bytes / 2**30
        state = f"{g.free_slots} free" if g.pinned else "pinned at the first load onto its GPUs"
        print(
            f"  pinned ring{node}: {g.slots} slots x {g.slot_bytes / 2**20:g} MiB = "
            f"{pinned:.2f} GiB, {state}; {g.sizing}"
        )
    for gpu in status.gpus:
        print(
            f"  cuda:{gpu.ordinal} {gpu.uuid}: CUDA context {'yes' if gpu.context else 'no'}, "
            f"arenas {gpu.arena_bytes / 2**30:.2f} GiB, ring {gpu.ring_bytes / 2**30:.2f} GiB"
        )
    for w in status.fetch_workers:
        again = f", restarted {w.restarts}x" if w.restarts else ""
        print(
            f"  fetch worker {w.index} ({w.mode}, pid {w.pid}): {w.gets} GETs, "
            f"{w.bytes / 1e9:.3f} GB, {w.cpu_seconds:.2f} CPU-s, "
            f"{w.connections_open} connections{again}"
        )
    for m in status.models:
        adopted = " adopted" if m.adopted else ""
        print(f"  {m.model_id} {m.state}{adopted} {m.bytes / 1e9:.3f} GB leases={m.leases} {m.uri}")
    for r in status.recent_loads:
        print(f"  load {r.outcome} {r.uri}: plan {r.plan_seconds:.2f}s arena "
              f"{r.arena_seconds:.2f}s first byte "
              f"{r.first_byte_seconds:.2f}s fetch {r.fetch_seconds:.2f}s total "
              f"{r.total_seconds:.2f}s {r.gbps:.2f} GB/s {r.error}")  # fmt: skip
    return 0
