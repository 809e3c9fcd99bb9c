"""One cold load onto GPUs: plan -> GPU layout -> arenas -> ring fetch -> H2D -> settle.

Fetchers take a ring slot, receive one range into it (with the same retries and checksum
checks as the CPU path, ``fetch._fetch_one``), and hand it to the copy engine, which
copies it to every target GPU before the slot is recycled: several GPUs cost one fetch.
The arenas are announced only after every copy is complete and the copy streams are
synchronised. On any failure or cancellation the arenas are released at once; a free
waits for the copies already queued, and each slot comes back when its copies are done.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

from tensorferry.cuda import CudaError, DeviceInfo
from tensorferry.daemon._tasks import task_group
from tensorferry.daemon.cuda_runtime import CudaRuntime
from tensorferry.daemon.fetch import FetchStats, RetryPolicy, _Budget, _fetch_one
from tensorferry.daemon.gpu_layout import Job, gpu_layout
from tensorferry.daemon.planner import Plan
from tensorferry.daemon.sinks.cuda import CudaArena
from tensorferry.daemon.store.base import Store
from tensorferry.errors import InternalError


@dataclasses.dataclass(frozen=True, slots=True)
class GpuLoaded:
    plan: Plan  # tensor offsets as the GPU arenas hold them
    arenas: tuple[CudaArena, ...]  # one per target, in the order asked for
    stats: FetchStats


async def _worker(
    store: Store, jobs: Iterator[Job], cuda: CudaRuntime, arenas: Sequence[CudaArena],
    policy: RetryPolicy, budget: _Budget, stats: FetchStats, progress: Callable[[int], None],
) -> None:  # fmt: skip
    for job in jobs:
        slot = await cuda.ring.acquire()
        try:
            r = job.range
            await _fetch_one(store, r, slot.view[: r.length], policy, budget, stats)
        except BaseException:
            cuda.ring.release(slot)  # nothing was queued from it
            raise
        cuda.engine.submit(slot, job.pieces, arenas)
        if not stats.first_byte:
            stats.first_byte = time.monotonic()
        stats.bytes += r.length
        stats.ranges += 1
        progress(r.length)


async def ring_fetch(
    store: Store, jobs: Sequence[Job], cuda: CudaRuntime, arenas: Sequence[CudaArena], *,
    concurrency: int, policy: RetryPolicy | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> FetchStats:  # fmt: skip
    """Fetch every job through the ring into the arenas; returns when all are queued."""
    policy = policy or RetryPolicy()
    stats = FetchStats(started=time.monotonic())
    budget = _Budget(policy.budget + len(jobs) // 8)
    shared = iter(jobs)
    # More workers than slots would only queue on the ring.
    workers = min(concurrency, cuda.ring.slots, len(jobs))
    async with task_group() as tg:
        for _ in range(workers):
            tg.create_task(_worker(store, shared, cuda, arenas, policy, budget, stats, progress))
    stats.finished = time.monotonic()
    return stats


async def load_plan_cuda(
    store: Store,
    plan: Plan,
    uri: str,
    cuda: CudaRuntime,
    targets: Sequence[DeviceInfo],
    *,
    concurrency: int,
    policy: RetryPolicy | None = None,
    on_plan: Callable[[Plan], None],
    progress: Callable[[int], None],
) -> GpuLoaded:
    """Place the plan's tensors in one arena on each target GPU, fetching them once."""
    gpu_plan, jobs = gpu_layout(plan, cuda.ring.slot_size)
    on_plan(gpu_plan)
    arenas: list[CudaArena] = []
    try:
        for device in targets:
            arenas.append(cuda.sink.allocate(device, gpu_plan.arena_size, uri))
        stats = await ring_fetch(
            store, jobs, cuda, arenas, concurrency=concurrency, policy=policy, progress=progress
        )
        await cuda.engine.settle(arenas)
    except CudaError as exc:
        for arena in arenas:
            cuda.sink.release(arena)
        raise InternalError(f"CUDA failed while placing {uri}: {exc}") from exc
    except BaseException:
        for arena in arenas:
            cuda.sink.release(arena)
        raise
    if not stats.ranges:
        stats.first_byte = stats.finished = time.monotonic()
    return GpuLoaded(gpu_plan, tuple(arenas), stats)
