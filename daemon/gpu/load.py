"""One cold load onto GPUs: plan -> GPU layout -> arenas -> ring fetch -> H2D -> settle.

Fetchers (the CPU path's workers, ``fetch.fetch_ranges``, with the same retries and
checksum checks) take a ring slot, receive one range into it, and hand it to the copy
engine, which copies it to every target GPU before the slot is recycled: several GPUs
cost one fetch.
The arenas are announced only after every copy is complete and the copy streams are
synchronised. On any failure or cancellation the arenas are released at once; a free
waits for the copies already queued, and each slot comes back when its copies are done.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from tensorferry.cuda import CudaError, DeviceInfo
from tensorferry.daemon.fetch.retries import FetchPolicy
from tensorferry.daemon.fetch.scheduler import Destination, FetchStats, fetch_ranges
from tensorferry.daemon.gpu.layout import Job, gpu_layout
from tensorferry.daemon.gpu.ring import PinnedRing, Slot
from tensorferry.daemon.gpu.runtime import CudaRuntime
from tensorferry.daemon.planner import Plan, Range
from tensorferry.daemon.sinks.cuda import CudaArena
from tensorferry.daemon.store.base import Store
from tensorferry.errors import InternalError


@dataclasses.dataclass(frozen=True, slots=True)
class GpuLoaded:
    plan: Plan  # tensor offsets as the GPU arenas hold them
    arenas: tuple[CudaArena, ...]  # one per target, in the order asked for
    stats: FetchStats


class _IntoRing(Destination[Job, Slot]):
    """Each range into a pinned ring slot, which then goes to the copy engine."""

    def __init__(self, ring: PinnedRing, cuda: CudaRuntime, arenas: Sequence[CudaArena]) -> None:
        self.acquire = ring.acquire
        self._ring = ring
        self._engine = cuda.engine
        self._arenas = arenas

    def place(self, job: Job, lent: Slot) -> tuple[Range, memoryview]:
        return job.range, lent.view[: job.range.length]

    def failed(self, lent: Slot) -> None:
        self._ring.release(lent)  # nothing was queued from it

    def landed(self, job: Job, lent: Slot) -> None:
        self._engine.submit(lent, job.pieces, self._arenas)


async def load_plan_cuda(
    store: Store,
    plan: Plan,
    uri: str,
    cuda: CudaRuntime,
    targets: Sequence[DeviceInfo],
    *,
    concurrency: int,
    policy: FetchPolicy | None = None,
    on_plan: Callable[[Plan], None],
    progress: Callable[[int], None],
) -> GpuLoaded:
    """Place the plan's tensors in one arena on each target GPU, fetching them once."""
    # The first load onto a GPU opens it (context, streams, its node's ring).
    await cuda.open_devices(targets)
    # The ring on the first target's NUMA node: its copies read local memory.
    ring = cuda.rings.for_targets(targets)
    gpu_plan, jobs = gpu_layout(plan, ring.slot_size)
    on_plan(gpu_plan)
    arenas: list[CudaArena] = []
    try:
        for device in targets:
            arenas.append(await cuda.sink.place(device, gpu_plan.arena_size, uri))
        # More workers than slots would only queue on the ring.
        slots = ring.slots
        policy = policy or FetchPolicy()
        policy = dataclasses.replace(policy, max_concurrency=min(policy.max_concurrency, slots))
        stats = await fetch_ranges(
            store, jobs, _IntoRing(ring, cuda, arenas), concurrency=min(concurrency, slots),
            policy=policy, progress=progress,
        )  # fmt: skip
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
