"""Where a planned load goes: a CPU shared-memory arena, or GPU arenas through the ring.

The service plans a load the same way for every device and calls ``place_plan``; this
module picks the path by the model's device and describes the result to workers
(``grant``: the Ready event's arena grant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tensorferry.daemon.cuda_load import load_plan_cuda
from tensorferry.daemon.devices import CPU
from tensorferry.daemon.fetch import RetryPolicy
from tensorferry.daemon.pipeline import Loaded, check_model_size, load_plan
from tensorferry.daemon.planner import Plan
from tensorferry.daemon.registry import Model, Registry
from tensorferry.daemon.sinks.cpu_shm import ShmArena
from tensorferry.daemon.store.base import Store
from tensorferry.v1 import tensorferry_pb2 as pb


async def place_plan(
    store: Store,
    plan: Plan,
    uri: str,
    model: Model,
    registry: Registry,
    *,
    concurrency: int,
    policy: RetryPolicy | None = None,
    max_model_bytes: int = 0,
    on_plan: Callable[[Plan], None],
    progress: Callable[[int], None],
) -> Loaded:
    """Fetch the plan into the model's arena (and its fan-out models' arenas, one fetch)."""
    devices = [model.key.device, *(m.key.device for m in model.fan_out)]
    if devices == [CPU]:
        return await load_plan(
            store, plan, uri, registry.sink, concurrency=concurrency, policy=policy,
            max_model_bytes=max_model_bytes, on_plan=on_plan, progress=progress,
        )  # fmt: skip
    cuda = registry.cuda
    assert cuda is not None, devices
    check_model_size(plan, uri, max_model_bytes)
    placed = await load_plan_cuda(
        store, plan, uri, cuda, [cuda.device(d) for d in devices], concurrency=concurrency,
        policy=policy, on_plan=on_plan, progress=progress,
    )  # fmt: skip
    first, *others = (Loaded(placed.plan, arena, placed.stats) for arena in placed.arenas)
    return dataclasses.replace(first, replicas=tuple(others))


def grant(loaded: Loaded) -> dict[str, Any]:
    """The Ready event's arena grant (its oneof field and message) for a loaded model."""
    arena = loaded.arena
    if isinstance(arena, ShmArena):
        return {"cpu_shm": pb.CpuShmGrant(name=arena.name, size=arena.size)}
    return {
        "cuda_ipc": pb.CudaIpcGrant(
            handle=arena.handle, size=arena.size, gpu_uuid=arena.device.uuid,
            pci_bus_id=arena.device.pci_bus_id,
        )
    }  # fmt: skip
