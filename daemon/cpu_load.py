"""One cold load: plan -> arena -> fetch. Releases the arena on every failure path.

A fresh arena's memory is reserved alongside the fetch (``sinks/populate.py``): each range
waits for the region under it, never for the whole arena.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from tensorferry import env
from tensorferry.daemon.fetch.retries import FetchPolicy
from tensorferry.daemon.fetch.scheduler import Destination, FetchStats, fetch_ranges
from tensorferry.daemon.planner import Plan, Range
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.daemon.sinks.cuda import CudaArena
from tensorferry.daemon.sinks.populate import Reservation
from tensorferry.daemon.store.base import Store
from tensorferry.daemon.tasks import task_group
from tensorferry.errors import ResourceExhausted

#: ``on_landed(arena_offset, length)``: those arena bytes are in place (``Arrivals``).
OnLanded = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    plan: Plan
    arena: ShmArena | CudaArena
    stats: FetchStats
    #: When the arena was allocated and all its memory reserved (``time.monotonic``).
    arena_ready: float = 0.0


class IntoArena(Destination[Range, None]):
    """Each range into its own slice of the arena: nothing is lent, nothing handed on."""

    def __init__(
        self, arena: memoryview, on_landed: OnLanded | None = None,
        reservation: Reservation | None = None,
    ) -> None:  # fmt: skip
        self._arena = arena
        self._on_landed = on_landed
        self._reservation = reservation
        if reservation is not None and not reservation.done:
            self.ready = self._reserved

    async def _reserved(self, job: Range) -> None:
        assert self._reservation is not None
        await self._reservation.ready(job.arena_offset + job.length)

    def place(self, job: Range, lent: None) -> tuple[Range, memoryview]:
        return job, self._arena[job.arena_offset : job.arena_offset + job.length]

    def landed(self, job: Range, lent: None) -> None:
        if self._on_landed is not None:
            self._on_landed(job.arena_offset, job.length)


def check_model_size(plan: Plan, uri: str, max_model_bytes: int) -> None:
    if max_model_bytes and plan.fetch_bytes > max_model_bytes:
        raise ResourceExhausted(
            f"{uri} needs {plan.fetch_bytes} bytes, above this daemon's limit of "
            f"{max_model_bytes} bytes ([limits] max_model_bytes); load a selection of its "
            "tensors or raise the limit"
        )


async def load_plan(
    store: Store,
    plan: Plan,
    uri: str,
    sink: CpuShmSink,
    *,
    concurrency: int,
    policy: FetchPolicy | None = None,
    max_model_bytes: int = 0,
    on_plan: Callable[[Plan], None],
    progress: Callable[[int], None],
    on_arena: Callable[[ShmArena], OnLanded | None] = lambda arena: None,
) -> Loaded:
    """Allocate the plan's arena and fetch its ranges; plans of every kind come here.

    ``on_arena`` sees the arena before the first byte is fetched; what it returns is told
    each range that lands (a streamed load's workers map the arena early)."""
    check_model_size(plan, uri, max_model_bytes)
    on_plan(plan)
    await sink.pool.settle()  # the warm pool, populated so far, is the arena to take
    arena = sink.allocate(plan.arena_size, uri)
    reservation, arena_ready = arena.reservation, time.monotonic()
    on_landed = None
    try:
        on_landed = on_arena(arena)
        dest = IntoArena(arena.view, on_landed, reservation)

        async def fetch() -> FetchStats:
            return await fetch_ranges(
                store, plan.ranges, dest, concurrency=concurrency, policy=policy,
                progress=progress,
            )  # fmt: skip

        if reservation is None:
            stats = await fetch()
        elif env.reserve_first():  # bench/bench_fresh.py only
            await reservation.run()
            stats = await fetch()
        else:
            # A failed reservation cancels the fetch; a failed fetch stops the reservation,
            # and both have ended before the arena is released.
            async with task_group() as tg:
                tg.create_task(reservation.run())
                stats = await fetch()
    except BaseException:
        # Streaming workers may have mapped it: their pages must never become another
        # model's, so the segment is unlinked, not kept for reuse.
        sink.release(arena, recycle=on_landed is None)
        raise
    # The daemon keeps its mapping while the model is resident: unmapping 2 GiB takes
    # 70 ms of the load here, and a freed arena is reused mapped (see sinks/cpu_shm.py).
    # The pages are the workers' pages: RssShmem, not RssAnon, and PSS counts them once.
    if not stats.ranges:
        stats.first_byte = stats.finished = time.monotonic()
    if reservation is not None:
        arena_ready = reservation.finished
    return Loaded(plan, arena, stats, arena_ready)
