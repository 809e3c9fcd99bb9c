"""GPU data path: pinned ring -> H2D on streams -> one arena, against a plain torch copy.

For slot sizes 8/16/32/64 MiB x copy streams 1/2/4, with the same pinned bytes in total
(--ring-mib), it measures in process (no gRPC, no worker):

- **load**: the daemon's whole GPU path for a local-directory model: file reads into
  pinned ring slots, H2D copies on the streams, events, slot recycling, the final sync.
  The model's files are read once beforehand, so the page cache serves them.
- **h2d**: the ring and copy engine alone: slots filled once, then copied to the arena
  over and over (what the link and the engine sustain without the reads).

and, once, a plain torch copy from one pinned tensor of the model's size
(``torch.empty(pin_memory=True)`` then ``.to("cuda", non_blocking=True)``).

Usage: .venv/bin/python bench/bench_gpu.py [--size-mib 2048] [--ring-mib 512] [--runs 3]
Without a CUDA device (or without cupy) it prints why and exits 0. ``--fake`` runs the
same code on the fake CUDA API (CI's stand-in): a check of the script, not a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tensorferry.cuda import CudaApi, FakeDevice, real_api
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.gpu.h2d import CopyEngine
from tensorferry.daemon.gpu.layout import Piece
from tensorferry.daemon.gpu.load import load_plan_cuda
from tensorferry.daemon.gpu.ring import PinnedRing
from tensorferry.daemon.gpu.rings import RingSet
from tensorferry.daemon.gpu.runtime import CudaRuntime
from tensorferry.daemon.planner import Plan, make_plan
from tensorferry.daemon.sinks.cuda import CudaSink
from tensorferry.daemon.source import list_source, parse_uri, read_source
from tensorferry.daemon.store.local import LocalStore
from tensorferry.devtools.modelgen import write_model

MiB = 1 << 20
SLOTS_MIB = (8, 16, 32, 64)
STREAMS = (1, 2, 4)


async def plan_for(model: Path, chunk: int) -> tuple[LocalStore, Plan, str]:
    ref = parse_uri(str(model))
    assert ref.path is not None
    store = LocalStore(ref.path, ref.uri)
    source = await read_source(ref, store, await list_source(ref, store))
    return store, make_plan(source, chunk), ref.uri


async def one_config(
    api: CudaApi, model: Path, slot: int, streams: int, ring_bytes: int, runs: int
) -> tuple[float, float]:
    """Median GB/s of (load, h2d) for one slot size and stream count."""
    device = api.devices()[0]
    ring = PinnedRing(api, max(2, ring_bytes // slot), slot).open()
    engine = CopyEngine(api, [device], [ring], streams).start()
    sink = CudaSink(api, reserve=0, instance="bench")
    cuda = CudaRuntime(api, [device], RingSet.single(ring), engine, sink)
    try:
        store, plan, uri = await plan_for(model, slot)
        loads: list[float] = []
        for _ in range(runs + 1):  # the first run warms up (context, page cache)
            t0 = time.perf_counter()
            got = await load_plan_cuda(
                store, plan, uri, cuda, [device], concurrency=32, on_plan=lambda p: None,
                progress=lambda n: None,
            )  # fmt: skip
            loads.append(plan.tensor_bytes / (time.perf_counter() - t0) / 1e9)
            sink.release(got.arenas[0])
        arena = sink.allocate(device, ring.size, "h2d")
        h2d: list[float] = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            copied = 0
            for _ in range(max(1, (4 << 30) // ring.size)):
                for _ in range(ring.slots):
                    s = await ring.acquire()
                    engine.submit(s, [Piece(0, s.index * slot, slot)], [arena])
                    copied += slot
            await engine.settle([arena])
            h2d.append(copied / (time.perf_counter() - t0) / 1e9)
        sink.release(arena)
        return statistics.median(loads[1:]), statistics.median(h2d[1:])
    finally:
        engine.close()
        await asyncio.sleep(0)
        sink.close()
        ring.close()


def torch_pinned(nbytes: int, runs: int) -> float:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    rates = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev = host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        del dev
    return statistics.median(rates[1:])


async def main_async(args: argparse.Namespace, api: CudaApi, model: Path) -> None:
    print(f"device: {api.devices()[0]} ({api.name}); model {args.size_mib} MiB; ring "
          f"{args.ring_mib} MiB pinned; median of {args.runs} runs; GB = 1e9 bytes")  # fmt: skip
    if not args.fake:
        rate = torch_pinned(args.size_mib * MiB, args.runs)
        print(f"torch pinned tensor -> cuda, one copy: {rate:6.2f} GB/s")
    print(f"{'slot':>6} {'streams':>7} {'load GB/s':>10} {'h2d GB/s':>9}")
    for slot_mib in SLOTS_MIB:
        for streams in STREAMS:
            load, h2d = await one_config(
                api, model, slot_mib * MiB, streams, args.ring_mib * MiB, args.runs
            )
            print(f"{slot_mib:>4}Mi {streams:>7} {load:>10.2f} {h2d:>9.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--ring-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a local safetensors directory to load")
    parser.add_argument("--fake", action="store_true", help="the fake CUDA API (a dry run)")
    args = parser.parse_args()
    if args.fake:
        memory = 2 * (args.size_mib + args.ring_mib) * MiB
        api: CudaApi | None = FakeCudaApi(
            [FakeDevice("GPU-00000000-0000-4000-8000-000000000000", memory)]
        )
    else:
        api = real_api()
    if api is None:
        print("bench_gpu: skipped: no CUDA device is visible (or cupy is missing: "
              "pip install 'tensorferry[cuda]')")  # fmt: skip
        return 0
    try:
        with tempfile.TemporaryDirectory(prefix="tf-bench-gpu-") as tmp:
            model = args.model
            if model is None:
                model = Path(tmp) / "model"
                write_model(model, args.size_mib * MiB, shards=4)
            for f in model.glob("*.safetensors"):
                f.read_bytes()  # into the page cache: the load measures the GPU path
            asyncio.run(main_async(args, api, model))
    finally:
        api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
