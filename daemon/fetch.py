"""The fetch scheduler: a sliding window of parallel range reads into their destination.

``concurrency`` workers pull ranges from one shared iterator, so a slow range never holds
back a whole wave (as ``gather`` in waves would). A range that fails for a reason that may
pass (a reset connection, a 503, a stall, a wrong Content-Range) is retried with
exponential backoff and jitter, within a per-range attempt limit and a per-load retry
budget; any other error, or an exhausted budget, cancels the rest.

A range that carries chunk checksums (a prepared artifact) is verified in place once it
has landed; a mismatch is read again, and one that persists is corrupt at rest.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator

import crc32c

from tensorferry.daemon._tasks import task_group
from tensorferry.daemon.planner import Range
from tensorferry.daemon.store.base import Store
from tensorferry.errors import DataLoss, StoreUnavailable

log = logging.getLogger(__name__)
#: Reads of a range whose checksum fails before it counts as corrupt at rest.
CHECKSUM_READS = 3
#: Chunks at least this large are checksummed off the event loop (crc32c drops the GIL).
_THREAD_CRC_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    #: Attempts per range, the first included.
    attempts: int = 5
    #: Retries allowed per load, on top of one per 8 ranges (a few flaky ranges are
    #: normal; hundreds mean the store is down and the load should fail fast).
    budget: int = 16
    base_delay: float = 0.05
    max_delay: float = 2.0
    #: Wall-clock limit for one attempt at one range.
    range_deadline: float = 300.0

    def delay(self, attempt: int) -> float:
        # "Full jitter": spreads retries of many ranges that failed together.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclasses.dataclass(slots=True)
class FetchStats:
    bytes: int = 0
    ranges: int = 0
    retries: int = 0
    causes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    started: float = 0.0
    first_byte: float = 0.0  # when the first range completed
    finished: float = 0.0


def _cause(exc: BaseException) -> str:
    message = str(exc)
    for marker in ("Content-Range", "Content-Length", "timed out", "HTTP 5", "Connection"):
        if marker in message:
            return marker.lower().replace(" ", "-")
    return type(exc).__name__


class _Budget:
    def __init__(self, total: int) -> None:
        self.left = total


def _first_bad_chunk(r: Range, dest: memoryview) -> tuple[int, int] | None:
    for offset, length, crc in r.checks:
        if crc32c.crc32c(dest[offset : offset + length]) != crc:
            return offset, length
    return None


async def _verify(r: Range, dest: memoryview) -> tuple[int, int] | None:
    if r.length >= _THREAD_CRC_BYTES:
        return await asyncio.to_thread(_first_bad_chunk, r, dest)
    return _first_bad_chunk(r, dest)


async def _fetch_one(
    store: Store, r: Range, dest: memoryview, policy: RetryPolicy, budget: _Budget,
    stats: FetchStats,
) -> None:  # fmt: skip
    attempt = mismatches = 0
    while True:
        try:
            async with asyncio.timeout(policy.range_deadline):
                await store.read_into(r.obj, r.start, dest)
        except (StoreUnavailable, TimeoutError) as exc:
            attempt += 1
            what = f"{store.describe(r.obj)} bytes {r.start}-{r.start + r.length - 1}"
            if attempt >= policy.attempts or budget.left <= 0:
                reason = "attempts" if attempt >= policy.attempts else "the load's retry budget"
                detail = exc.message if isinstance(exc, StoreUnavailable) else f"{what}: {exc}"
                raise StoreUnavailable(
                    f"{detail} (gave up after {attempt} attempts; {reason} exhausted)"
                ) from exc
            budget.left -= 1
            stats.retries += 1
            stats.causes[_cause(exc)] += 1
            log.info("retrying %s (attempt %d): %s", what, attempt + 1, exc)
            await asyncio.sleep(policy.delay(attempt))
            continue
        bad = await _verify(r, dest) if r.checks else None
        if bad is None:
            return
        mismatches += 1
        at, length = r.start + bad[0], bad[1]
        if mismatches >= CHECKSUM_READS:
            raise DataLoss(
                f"{store.describe(r.obj)}: the chunk at byte {at} ({length} bytes) failed its "
                f"crc32c check {mismatches} times: the stored artifact is corrupt; run "
                "`tensorferry prepare` again to rewrite it"
            )
        stats.retries += 1
        stats.causes["checksum"] += 1
        store.forget(r.obj, r.start, r.length)  # a disk tier must not serve them again
        log.warning("%s: chunk at byte %d failed its checksum; reading it again",
                    store.describe(r.obj), at)  # fmt: skip


async def _worker(
    store: Store, ranges: Iterator[Range], dest: memoryview, policy: RetryPolicy,
    budget: _Budget, stats: FetchStats, progress: Callable[[int], None],
) -> None:  # fmt: skip
    for r in ranges:
        view = dest[r.arena_offset : r.arena_offset + r.length]
        await _fetch_one(store, r, view, policy, budget, stats)
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
    policy: RetryPolicy | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> FetchStats:
    policy = policy or RetryPolicy()
    stats = FetchStats(started=time.monotonic())
    todo = list(ranges)
    budget = _Budget(policy.budget + len(todo) // 8)
    shared = iter(todo)
    async with task_group() as tg:
        for _ in range(min(concurrency, len(todo))):
            tg.create_task(_worker(store, shared, dest, policy, budget, stats, progress))
    stats.finished = time.monotonic()
    return stats
