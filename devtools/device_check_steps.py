"""The steps of the device check (``device_check``): what the daemon holds on the GPUs, the
worker that loads and proves every byte, and the in-process H2D stage."""

from __future__ import annotations

import asyncio
import gc
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tensorferry.client import Client
from tensorferry.cuda import CudaApi, FakeDevice, real_api

#: The fake GPUs of a dry run (daemon and workers number them alike).
GPUS = ("GPU-dc000000-0000-4000-8000-000000000001", "GPU-dc000000-0000-4000-8000-000000000002")
MiB = 1 << 20


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The worker's next line ('' when it is silent for ``timeout`` s: it is then killed)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.wait()
        return ""


def process_gpu_bytes(pid: int) -> int | None:
    """GPU memory ``pid`` holds as nvidia-smi lists it (0: not listed, so no context, or
    a PID of another namespace: ``pid_unseen`` tells which); None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    used = 0
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            used += int(fields[1]) * MiB
    return used


def idle_state(client: Client, pid: int) -> dict[str, Any]:
    gpus = client.status().gpus
    arenas = sum(g.arena_bytes for g in gpus)
    smi = process_gpu_bytes(pid)
    return {
        "contexts": [g.context for g in gpus],
        "arena_bytes": arenas,
        "ring_bytes": max((g.ring_bytes for g in gpus), default=0),
        # On the fake API, device memory is its arenas (a fake context costs nothing).
        "gpu_bytes": arenas if smi is None else smi,
        "gpu_bytes_from": "status (fake CUDA)" if smi is None else "nvidia-smi",
    }


def pid_unseen(out: dict[str, Any]) -> None:
    """nvidia-smi lists processes by the host's PIDs: in a pod without hostPID the daemon's
    never appears, and its 0 bytes say nothing. Where it is missing even while arenas are
    loaded, every ``gpu_bytes`` from nvidia-smi becomes unknown (None)."""
    loaded = out["loaded"]
    if loaded["gpu_bytes_from"] != "nvidia-smi" or not loaded["arena_bytes"]:
        return
    if loaded["gpu_bytes"]:
        return
    for key in ("idle", "loaded", "after_evict"):
        out[key]["gpu_bytes"] = None
        out[key]["gpu_bytes_from"] = (
            "unknown: nvidia-smi never lists the daemon's PID, even with arenas loaded "
            "(another PID namespace: a pod without hostPID)"
        )


def worker_main(socket: str, uri: str, model_dir: str) -> int:
    """A fresh worker: load onto cuda:0, compare with ``load_file``, prove zero copy, hold
    the lease until stdin closes, then close and report the mappings left open."""
    import torch
    from safetensors.torch import load_file

    from tensorferry.client import _cuda

    fake = not torch.cuda.is_available()
    want: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        want.update(load_file(f, device="cpu" if fake else "cuda:0"))

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    with Client(socket) as client:
        t0 = time.perf_counter()
        model = client.load(uri, "cuda:0")
        seconds = time.perf_counter() - t0
        got = model.tensors
        equal = sorted(got) == sorted(want) and all(
            got[k].dtype == want[k].dtype and torch.equal(raw(got[k]), raw(want[k])) for k in want
        )
        arena = next(g.arena_bytes for g in client.status().gpus if g.ordinal == 0)
        maps = list(_cuda._open.values())
        inside = len(maps) == 1 and all(
            maps[0].ptr <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size()
            <= maps[0].ptr + arena
            for t in got.values() if t.numel()
        )  # fmt: skip
        print(json.dumps({
            "seconds": round(seconds, 3), "gbps": round(model.total_bytes / seconds / 1e9, 2),
            "attached": model.attached, "tensors": len(got), "byte_equal": equal,
            "zero_copy": inside, "device": str(next(iter(got.values())).device),
        }), flush=True)  # fmt: skip
        sys.stdin.read()
        del got, model, want
        gc.collect()
        _cuda.close_released()
    print(json.dumps({"closed": len(_cuda._open)}), flush=True)
    return 0


def h2d_stage(dry: bool, nbytes: int) -> dict[str, Any]:
    """Ring -> arena through the copy engine against one plain pinned copy of the same
    bytes on one stream, and cudaHostRegister's seconds per GB."""
    if dry:
        from tensorferry.cuda.fake import FakeCudaApi

        api: CudaApi | None = FakeCudaApi([FakeDevice(GPUS[0], memory=2 * nbytes + 64 * MiB)])
    else:
        api = real_api()
    if api is None:
        return {"error": "no usable CUDA (cupy) in this process"}
    try:
        return asyncio.run(_h2d(api, nbytes, MiB if dry else 8 * MiB))
    finally:
        api.close()


async def _h2d(api: CudaApi, nbytes: int, slot: int) -> dict[str, Any]:
    from tensorferry.daemon.gpu.h2d import CopyEngine
    from tensorferry.daemon.gpu.layout import Piece
    from tensorferry.daemon.gpu.ring import PinnedRing
    from tensorferry.daemon.sinks.cuda import CudaSink

    device = api.devices()[0]
    ring = PinnedRing(api, max(2, nbytes // slot), slot)
    t0 = time.perf_counter()
    ring.pin(ordinal=0)
    register = time.perf_counter() - t0
    ring.hand_out()
    engine = CopyEngine(api, [device], [ring], 2).start()
    sink = CudaSink(api, reserve=0, instance="device-check")
    try:
        arena = sink.allocate(device, ring.size, "h2d")
        rates = []
        for _ in range(3):  # the first warms up
            t0 = time.perf_counter()
            for _ in range(ring.slots):
                s = await ring.acquire()
                engine.submit(s, [Piece(0, s.index * slot, slot)], [arena])
            await engine.settle([arena])
            rates.append(ring.size / (time.perf_counter() - t0) / 1e9)
        stream = api.stream_create(0)
        peaks = []
        for _ in range(3):
            t0 = time.perf_counter()
            api.memcpy_h2d_async(arena.ptr, ring.ptr, ring.size, stream)
            api.stream_synchronize(stream)
            peaks.append(ring.size / (time.perf_counter() - t0) / 1e9)
        sink.release(arena)
    finally:
        engine.close()
        await asyncio.sleep(0)
        sink.close()
        ring.close()
    h2d, peak = max(rates[1:]), max(peaks[1:])
    return {
        "ring_bytes": ring.size, "slot_bytes": slot, "copy_streams": 2,
        "h2d_gbps": round(h2d, 2), "pinned_peak_gbps": round(peak, 2),
        "h2d_of_peak": round(h2d / peak, 3), "host_register_s_per_gb": round(
            register / (ring.size / 1e9), 3),
    }  # fmt: skip
