"""The fetch scheduler: a sliding window of parallel range reads into their destination.

``concurrency`` workers pull ranges from one shared iterator, so a slow range never holds
back a whole wave (as ``gather`` in waves would). A range that fails for a reason that may
pass (a reset connection, a 503, a stall, a wrong Content-Range) is retried with
exponential backoff and jitter, within a per-range attempt limit and a per-load retry
budget; any other error, or an exhausted budget, cancels the rest.

A range that carries chunk checksums (a prepared artifact) is verified in place once it
has landed; a mismatch is read again (a retry, from the same budget), and one that
persists is corrupt at rest.

Both load paths share this one worker; a ``Destination`` says where each range lands: its
own slice of a shared-memory arena (the CPU path, ``cpu_load``), or a pinned ring slot
lent per range and handed to the copy engine once filled (the GPU path, ``gpu.load``).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import crc32c

from tensorferry.daemon.fetch.hedging import Hedger, read_hedged
from tensorferry.daemon.fetch.pacing import INTERVAL, Pace
from tensorferry.daemon.fetch.retries import Budget, FetchPolicy, cause, gave_up
from tensorferry.daemon.planner import Range
from tensorferry.daemon.store.base import METER, BodyMeter, Store
from tensorferry.daemon.tasks import task_group
from tensorferry.daemon.threads import run_to_end
from tensorferry.errors import DataLoss, StoreUnavailable

log = logging.getLogger(__name__)
J = TypeVar("J")  # one fetch job: a range, with whatever its destination needs
S = TypeVar("S")  # what a destination lends for one range (a ring slot), None if nothing
#: Reads of a range whose checksum fails before it counts as corrupt at rest.
CHECKSUM_READS = 3
#: Chunks at least this large are checksummed off the event loop (crc32c drops the GIL).
_THREAD_CRC_BYTES = 1 << 20


@dataclasses.dataclass(slots=True)
class FetchStats:
    bytes: int = 0
    ranges: int = 0
    retries: int = 0
    causes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    started: float = 0.0
    first_byte: float = 0.0  # when the first range completed
    finished: float = 0.0
    hedges: int = 0  # ranges requested a second time as stragglers
    workers: int = 0  # GETs in flight the load settled on


def _first_bad_chunk(r: Range, dest: memoryview) -> tuple[int, int] | None:
    for offset, length, crc in r.checks:
        if crc32c.crc32c(dest[offset : offset + length]) != crc:
            return offset, length
    return None


async def _verify(r: Range, dest: memoryview) -> tuple[int, int] | None:
    if r.length >= _THREAD_CRC_BYTES:
        # Waited for even when cancelled: dest may be unmapped or reused once we return.
        return await run_to_end(lambda _stop: _first_bad_chunk(r, dest))
    return _first_bad_chunk(r, dest)


async def _fetch_one(
    store: Store, r: Range, dest: memoryview, policy: FetchPolicy, budget: Budget,
    stats: FetchStats, hedger: Hedger | None,
) -> None:  # fmt: skip
    attempt = mismatches = 0
    while True:
        try:
            async with asyncio.timeout(policy.range_deadline):
                if hedger is None:
                    await store.read_into(r.obj, r.start, dest)
                elif await read_hedged(store, r.obj, r.start, dest, hedger):
                    stats.hedges += 1
        except (StoreUnavailable, TimeoutError) as exc:
            attempt += 1
            what = f"{store.describe(r.obj)} bytes {r.start}-{r.start + r.length - 1}"
            if attempt >= policy.attempts or budget.left <= 0:
                detail = exc.message if isinstance(exc, StoreUnavailable) else f"{what}: {exc}"
                raise StoreUnavailable(gave_up(detail, attempt, policy)) from exc
            budget.left -= 1
            stats.retries += 1
            stats.causes[cause(exc)] += 1
            log.info("retrying %s (attempt %d): %s", what, attempt + 1, exc)
            await asyncio.sleep(policy.delay(attempt))
            continue
        bad = await _verify(r, dest) if r.checks else None
        if bad is None:
            return
        mismatches += 1
        at, length = r.start + bad[0], bad[1]
        store.forget(r.obj, r.start, r.length)  # a disk tier must not serve them again
        chunk = f"{store.describe(r.obj)}: the chunk at byte {at} ({length} bytes)"
        if mismatches >= CHECKSUM_READS:
            raise DataLoss(
                f"{chunk} failed its crc32c check {mismatches} times: the stored artifact is "
                "corrupt; run `tensorferry prepare` again to rewrite it"
            )
        if budget.left <= 0:  # a path corrupting every range must not read each 3 times
            raise DataLoss(
                f"{chunk} failed its crc32c check and the load's retry budget is exhausted "
                f"({stats.retries} retried, {stats.causes['checksum']} of them after a failed "
                "check): bytes arrive corrupted, so check the path to the store (a proxy or "
                "cache on the way, the network) and load again; run `tensorferry prepare` "
                "again if the stored artifact itself is corrupt"
            )
        budget.left -= 1
        stats.retries += 1
        stats.causes["checksum"] += 1
        log.warning("%s: chunk at byte %d failed its checksum; reading it again",
                    store.describe(r.obj), at)  # fmt: skip


class Destination(abc.ABC, Generic[J, S]):
    """Where each job's range lands, and what becomes of it once it has.

    A destination with ``acquire`` lends a buffer for each range, waiting for a free one:
    ``failed`` takes it back when the read fails, ``landed`` hands it on once it succeeds.
    One without (an arena: every range has its own place) costs the worker no await.
    One with ``ready`` is waited on before each job's read: its memory may not be
    writable yet (an arena reserved alongside the fetch, ``sinks/populate.py``).
    """

    acquire: Callable[[], Awaitable[S]] | None = None
    ready: Callable[[J], Awaitable[None]] | None = None

    @abc.abstractmethod
    def place(self, job: J, lent: S) -> tuple[Range, memoryview]:
        """The job's range and the memory it is read into."""

    def failed(self, lent: S) -> None:
        """The read failed or was cancelled: ``lent`` holds nothing to hand on."""

    def landed(self, job: J, lent: S) -> None:
        """The range is in place and verified."""


@dataclasses.dataclass(slots=True)
class _Shared:
    """What a load's workers share: the jobs, the retry budget and the pace."""

    jobs: Iterator[Any]
    policy: FetchPolicy
    budget: Budget
    stats: FetchStats
    pace: Pace
    hedger: Hedger | None
    progress: Callable[[int], None]
    meter: BodyMeter = dataclasses.field(default_factory=BodyMeter)
    exhausted: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


async def _worker(
    store: Store, index: int, shared: _Shared, dest: Destination[J, S]
) -> None:  # fmt: skip
    acquire = dest.acquire
    nothing = cast(S, None)  # what a destination that lends nothing is given back
    stats, jobs = shared.stats, cast(Iterator[J], shared.jobs)
    while index < shared.pace.workers:  # a step the pace took back ends its workers
        job = next(jobs, None)
        if job is None:
            shared.exhausted.set()
            return
        lent = nothing if acquire is None else await acquire()
        try:
            if dest.ready is not None:
                await dest.ready(job)
            r, view = dest.place(job, lent)
            await _fetch_one(store, r, view, shared.policy, shared.budget, stats, shared.hedger)
        except BaseException:
            dest.failed(lent)
            raise
        dest.landed(job, lent)
        if not stats.first_byte:
            stats.first_byte = time.monotonic()
        stats.bytes += r.length
        stats.ranges += 1
        shared.progress(r.length)


async def fetch_ranges(
    store: Store,
    jobs: Sequence[J],
    dest: Destination[J, S],
    *,
    concurrency: int,
    policy: FetchPolicy | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> FetchStats:
    """Read every job's range into ``dest``; returns once all have landed.

    ``concurrency`` workers start; the pace may add more, up to the policy's
    ``max_concurrency`` (and never more than there are jobs)."""
    policy = policy or FetchPolicy()
    stats = FetchStats(started=time.monotonic())
    ceiling = min(max(policy.max_concurrency, concurrency), len(jobs))
    pace = Pace(
        min(concurrency, len(jobs)), ceiling, float(policy.target_rate), policy.link_rate,
        stats.started,
    )  # fmt: skip
    shared = _Shared(
        iter(jobs), policy, Budget(policy.budget + len(jobs) // 8), stats, pace,
        Hedger(len(jobs)) if policy.hedge else None, progress,
    )  # fmt: skip
    # The workers' tasks inherit the meter: their connections count into it.
    token = METER.set(shared.meter)
    try:
        await _run(store, shared, dest)
    finally:
        METER.reset(token)
    stats.finished = time.monotonic()
    stats.workers = pace.workers
    return stats


async def _run(store: Store, shared: _Shared, dest: Destination[J, S]) -> None:
    async with task_group() as tg:
        running: set[int] = set()

        async def worker(index: int) -> None:
            try:
                await _worker(store, index, shared, dest)
            finally:
                running.discard(index)

        def grow(target: int) -> None:
            # A worker past the target ends after its range; one that has ended is started
            # again if the pace grows back past it (a jump taken back, then doubling).
            for index in range(target):
                if index not in running:
                    running.add(index)
                    tg.create_task(worker(index))

        grow(shared.pace.workers)
        # Even a fixed number of GETs is sampled: SlowDowns shed them.
        if shared.pace.workers > 1 or shared.pace.ceiling > 1:
            tg.create_task(_steer(store.uri, shared, grow))


async def _steer(uri: str, shared: _Shared, grow: Callable[[int], None]) -> None:
    """Sample the load's throughput and SlowDowns and let the pace grow or shed workers,
    until the jobs run out (then at once: a finished load must not wait for a sample).
    A settled pace is still sampled: SlowDowns may yet shed workers."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INTERVAL):
                await shared.exhausted.wait()
        if shared.exhausted.is_set():
            return
        meter = shared.meter
        pace, before = shared.pace, shared.pace.workers
        grow(pace.sample(max(meter.bytes, shared.stats.bytes), None, meter.slowdowns))
        if pace.workers != before:
            log.info("%s: %d -> %d GETs in flight (%s)", uri, before, pace.workers, pace.reason)
