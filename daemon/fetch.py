"""The fetch scheduler: a sliding window of parallel range reads into their destination.

``concurrency`` workers pull ranges from one shared iterator, so a slow range never holds
back a whole wave (as ``gather`` in waves would); the first error cancels the rest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

from tensorferry.daemon._tasks import task_group
from tensorferry.daemon.planner import Range
from tensorferry.daemon.store.base import Store


@dataclasses.dataclass(slots=True)
class FetchStats:
    bytes: int = 0
    ranges: int = 0
    started: float = 0.0
    first_byte: float = 0.0  # when the first range completed
    finished: float = 0.0


async def _worker(
    store: Store,
    ranges: Iterator[Range],
    dest: memoryview,
    stats: FetchStats,
    progress: Callable[[int], None],
) -> None:
    for r in ranges:
        await store.read_into(r.obj, r.start, dest[r.arena_offset : r.arena_offset + r.length])
        if not stats.first_byte:
            stats.first_byte = time.monotonic()
        stats.bytes += r.length
        stats.ranges += 1
        progress(r.length)


async def fetch_ranges(
    store: Store,
    ranges: Iterable[Range],
    dest: memoryview,
    *,
    concurrency: int,
    progress: Callable[[int], None] = lambda n: None,
) -> FetchStats:
    stats = FetchStats(started=time.monotonic())
    todo = list(ranges)
    shared = iter(todo)
    async with task_group() as tg:
        for _ in range(min(concurrency, len(todo))):
            tg.create_task(_worker(store, shared, dest, stats, progress))
    stats.finished = time.monotonic()
    return stats
