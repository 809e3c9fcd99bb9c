"""When a range GET straggles, ask again on another connection.

``Hedger`` watches the load's own range times and first-byte times: once it has seen
enough, a range still running past ``SLOW`` times the 90th percentile of range times, or a
GET with no first byte past ``SLOW`` times the median first byte, is requested again on
another connection, into a spare buffer; the first complete copy wins and the other is
cancelled. First bytes are judged by the median: a busy store (or proxy) stretches their
tail, and a tail-based deadline then grows past the very stalls it should catch. The
first-byte rule catches a stalled answer within a fraction of a second even when ranges
take seconds each on a slow link; it holds back while many GETs wait at once (``CROWD``).
At most ``HEDGE_SHARE`` of a load's ranges are hedged, and ``MAX_SPARES`` at once, so a
store that is slow everywhere gets no extra load from it.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import cast

from tensorferry.daemon.fetch.pacing import INTERVAL
from tensorferry.daemon.store.base import TIMING, GetTiming, ObjectInfo, Store

#: Ranges whose times are known before any is hedged.
MIN_SAMPLES = 8
#: A range is a straggler past this multiple of the load's 90th-percentile range time.
SLOW = 4.0
#: Never hedge sooner than this: the first byte of a healthy GET may take this long.
MIN_HEDGE_SECONDS = 0.5
#: At most this share of a load's ranges are hedged (and at least one may be).
HEDGE_SHARE = 0.05
#: Hedges running at once (each holds a spare buffer of one range).
MAX_SPARES = 4
#: No first-byte hedge while more than this share of the GETs sent a deadline ago (and
#: more than CROWD_FLOOR) still wait for a first byte: that is a congested store or path,
#: not a straggler, and asking again would add to it (a proxy at its limit).
CROWD = 0.25
CROWD_FLOOR = 2


class _Quantile:
    """A quantile of a load's samples from a histogram of log-spaced buckets.

    Bounded work per sample, whatever the load's length: a sample costs a logarithm and a
    Fenwick-tree update (log2 of the bucket count, 9 steps), a read after new samples the
    same again; memory is fixed. Sorting every sample so far, as before, cost 12.8 CPU-s
    of the loop over 40k ranges. The value is the largest sample seen in the bucket that
    holds the exact quantile: at most ``RATIO`` times the exact one, never below it, and
    exact while a load's times take few distinct values.
    """

    #: Buckets cover [LOW, LOW * RATIO**BUCKETS): 100 us to 14 hours; outliers are clamped.
    LOW = 1e-4
    RATIO = 1.04
    BUCKETS = 512  # a power of two: the tree's search halves it

    def __init__(self, q: float) -> None:
        self.q = q
        self.count = 0
        self._tree = [0] * (self.BUCKETS + 1)  # Fenwick tree of bucket counts, 1-based
        self._top = [0.0] * self.BUCKETS  # the largest sample in each bucket
        self._value = 0.0
        self._stale = False

    def add(self, seconds: float) -> None:
        b = 0
        if seconds > self.LOW:
            b = int(min(math.log(seconds / self.LOW) / _LOG_RATIO, self.BUCKETS - 1))
        if seconds > self._top[b]:
            self._top[b] = seconds
        i = b + 1
        while i <= self.BUCKETS:
            self._tree[i] += 1
            i += i & -i
        self.count += 1
        self._stale = True

    @property
    def value(self) -> float:
        if self._stale:
            self._stale = False
            rank = min(self.count - 1, int(self.count * self.q))  # 0-based, as sorted()[rank]
            pos, step = 0, self.BUCKETS
            while step:  # the first bucket whose running count passes ``rank``
                if self._tree[pos + step] <= rank:
                    pos += step
                    rank -= self._tree[pos]
                step >>= 1
            self._value = self._top[pos]
        return self._value


_LOG_RATIO = math.log(_Quantile.RATIO)


class Hedger:
    """A load's range and first-byte times, and whether a running range is late enough to
    ask again."""

    def __init__(self, ranges: int) -> None:
        self._times = _Quantile(0.9)
        self._first = _Quantile(0.5)
        self.allowed = max(1, int(ranges * HEDGE_SHARE))
        self.hedged = 0
        self.spares = 0
        self.won = 0
        self._free: list[bytearray] = []
        #: The load's GETs that may be hedged, while they run.
        self.live: set[GetTiming] = set()

    def observe(self, seconds: float) -> None:
        self._times.add(seconds)

    def observe_first_byte(self, seconds: float) -> None:
        self._first.add(seconds)

    def _limit(self, quantile: _Quantile) -> float | None:
        if quantile.count < MIN_SAMPLES or self.hedged >= self.allowed:
            return None
        return max(MIN_HEDGE_SECONDS, quantile.value * SLOW)

    def deadline(self) -> float | None:
        """Seconds after which the range being started should be hedged (None: never)."""
        return self._limit(self._times)

    def first_byte_deadline(self) -> float | None:
        """Seconds a sent GET may wait for its first byte before it is hedged (None: never)."""
        return self._limit(self._first)

    def crowded(self, limit: float, now: float) -> bool:
        """Whether many of the load's GETs sent ``limit`` seconds ago or more still wait
        for a first byte (GETs sent since, a burst of new connections, are not judged)."""
        due = [t for t in self.live if t.sent is not None and now - t.sent >= limit]
        late = sum(1 for t in due if t.first_byte is None)
        return late > max(CROWD_FLOOR, len(due) * CROWD)

    def may_start(self) -> bool:
        return self.hedged < self.allowed and self.spares < MAX_SPARES

    def take_spare(self, size: int) -> memoryview:
        """A buffer for one hedge; kept for the load's next ones (fresh pages cost a fault
        per 4 KiB)."""
        self.spares += 1
        for i, buf in enumerate(self._free):
            if len(buf) >= size:
                return memoryview(self._free.pop(i))[:size]
        return memoryview(bytearray(size))

    def give_spare(self, spare: memoryview, reuse: bool) -> None:
        self.spares -= 1
        if reuse:
            self._free.append(cast(bytearray, spare.obj))


async def read_hedged(
    store: Store, obj: ObjectInfo, start: int, dest: memoryview, hedger: Hedger
) -> bool:
    """``store.read_into``, asked again on another connection if it straggles; True when a
    hedge was sent. The hedge reads into a spare buffer, copied in only once the first
    request is cancelled and done: two readers never write ``dest`` at once."""
    t0 = time.monotonic()
    timing = GetTiming(on_first_byte=hedger.observe_first_byte)
    # The connection that carries the GET finds ``timing`` in its task's context.
    token = TIMING.set(timing)
    try:
        if not hedger.may_start():  # hedges spent or spares busy: no task of its own
            await store.read_into(obj, start, dest)
            hedger.observe(time.monotonic() - t0)
            return False
        primary = asyncio.ensure_future(store.read_into(obj, start, dest))
    finally:
        TIMING.reset(token)
    tasks = [primary]
    hedger.live.add(timing)
    try:
        if not await _straggles(primary, timing, t0, hedger) or not hedger.may_start():
            await primary
            hedger.observe(time.monotonic() - t0)
            return False
        hedger.hedged += 1
        spare = hedger.take_spare(len(dest))
        hedge = asyncio.ensure_future(store.read_into(obj, start, spare))
        tasks.append(hedge)
        try:
            winner = await _first_success(primary, hedge)
            if winner is hedge:
                primary.cancel()
                await asyncio.wait([primary])
                dest[:] = spare
                hedger.won += 1
        finally:
            hedge.cancel()
            try:
                await asyncio.wait([hedge])
            finally:
                # A read still running (we were cancelled meanwhile) may yet write into it.
                hedger.give_spare(spare, reuse=hedge.done())
        hedger.observe(time.monotonic() - t0)
        return True
    finally:
        hedger.live.discard(timing)
        for task in tasks:
            task.cancel()
        # Wait for both: a cancelled read must have stopped writing before we return.
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: the winner's or the reason both failed


async def _straggles(
    primary: asyncio.Future[None], timing: GetTiming, t0: float, hedger: Hedger
) -> bool:
    """Wait until ``primary`` is done (False) or straggles (True): running past the range
    deadline, or sent with no byte back past the first-byte deadline. Both are looked up
    again each time: early in a load they appear as the first samples arrive."""
    while not primary.done():
        now = time.monotonic()
        deadline = hedger.deadline()
        # Looked at again soon while a first byte is awaited; after that only the range
        # deadline applies (4x the p90 of whole ranges): a slow link's ranges take seconds,
        # and waking each of hundreds every half second to look cost the load CPU.
        waits = [INTERVAL if timing.first_byte is None else 4 * INTERVAL]
        if deadline is not None:
            if now - t0 >= deadline:
                return True
            waits.append(t0 + deadline - now)
        first_limit = hedger.first_byte_deadline()
        # Not yet sent (a SlowDown pause, a connection being opened): not the store's delay.
        if first_limit is not None and timing.sent is not None and timing.first_byte is None:
            if now - timing.sent >= first_limit and not hedger.crowded(first_limit, now):
                return True
            waits.append(max(timing.sent + first_limit - now, 0.0) or INTERVAL)
        await asyncio.wait([primary], timeout=min(waits))
    return False


async def _first_success(a: asyncio.Future[None], b: asyncio.Future[None]) -> asyncio.Future[None]:
    """The first of the two to complete without an error; if both fail, the first's error."""
    pending = {a, b}
    failed: list[BaseException] = []
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in (a, b):
            if task in done:
                exc = task.exception()
                if exc is None:
                    return task
                failed.append(exc)
    raise failed[0]
