"""Where a planned load goes: a CPU shared-memory arena, or GPU arenas through the ring.

The loader plans a load the same way for every device and calls ``place_plan``; this
module picks the path by the devices: the one place that does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tensorferry.daemon.cpu_load import Loaded, OnLanded, check_model_size, load_plan
from tensorferry.daemon.devices import CPU
from tensorferry.daemon.fetch.retries import FetchPolicy
from tensorferry.daemon.gpu.load import load_plan_cuda
from tensorferry.daemon.planner import Plan
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.daemon.store.base import Store

if TYPE_CHECKING:
    from tensorferry.daemon.gpu.runtime import CudaRuntime


async def place_plan(
    store: Store,
    plan: Plan,
    uri: str,
    devices: list[str],
    cpu: CpuShmSink,
    cuda: CudaRuntime | None,
    *,
    concurrency: int,
    policy: FetchPolicy | None = None,
    max_model_bytes: int = 0,
    on_plan: Callable[[Plan], None],
    progress: Callable[[int], None],
    on_arena: Callable[[ShmArena], OnLanded | None] = lambda arena: None,
) -> tuple[Loaded, ...]:
    """Fetch the plan into an arena on each device (several GPUs: one fetch fills all);
    one result per device, in the order given."""
    if devices == [CPU]:
        loaded = await load_plan(
            store, plan, uri, cpu, concurrency=concurrency, policy=policy,
            max_model_bytes=max_model_bytes, on_plan=on_plan, progress=progress,
            on_arena=on_arena,
        )  # fmt: skip
        return (loaded,)
    assert cuda is not None, devices
    check_model_size(plan, uri, max_model_bytes)
    placed = await load_plan_cuda(
        store, plan, uri, cuda, [cuda.device(d) for d in devices], concurrency=concurrency,
        policy=policy, on_plan=on_plan, progress=progress,
    )  # fmt: skip
    return tuple(Loaded(placed.plan, arena, placed.stats) for arena in placed.arenas)
