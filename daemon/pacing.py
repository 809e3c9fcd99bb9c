"""How many range GETs a load keeps in flight, and when a straggler is asked for again.

Object stores serve each connection at a fraction of a host's link (S3: ~90 MB/s, 20-60
ms to first byte, a long tail), so the number of GETs in flight decides what a load
reaches. ``Pace`` starts at ``s3.concurrency`` and, while throughput keeps rising with
each step, doubles the workers (quadruples after a step that nearly doubled throughput)
up to ``s3.max_concurrency`` (or until ``s3.target_rate``);
a step that brought less than ``GAIN`` more is taken back, and growth stops there: more
would only queue. On loopback, where a core is the limit, the first step is taken back.

``Hedger`` watches the load's own range times and first-byte times: once it has seen
enough, a range still running past a high percentile of range times, or a GET with no
first byte past a high percentile of first-byte times (each times ``SLOW``), is requested
again on another connection, into a spare buffer; the first complete copy wins and the
other is cancelled. The first-byte rule catches a stalled answer within a fraction of a
second even when ranges take seconds each on a slow link.
At most ``HEDGE_SHARE`` of a load's ranges are hedged, and ``MAX_SPARES`` at once, so a
store that is slow everywhere gets no extra load from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from tensorferry.daemon.store.base import TIMING, GetTiming, ObjectInfo, Store

#: A growth step (doubling the GETs in flight) must raise throughput by this much to stay:
#: on a link that limits each connection it brings +100%; where a core is the limit, a few
#: percent, and ramp-up noise must not pass for a gain.
GAIN = 0.3
#: A doubling that raised throughput by this much found a link that caps each connection:
#: the next step quadruples.
LINEAR = 0.8
#: Seconds between throughput samples.
INTERVAL = 0.5
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


@dataclasses.dataclass
class Pace:
    """The target number of workers; ``fetch_ranges`` starts workers up to it and a worker
    whose index is past it stops after its current range.

    Throughput is sampled from body bytes as they arrive (``BodyMeter``), not from whole
    ranges landing: a range may take seconds on a slow connection, and a load must not
    wait that long to learn whether a step paid."""

    start: int
    ceiling: int
    #: Bytes per second at which growth stops (0: grow while it pays).
    target_bps: float = 0.0
    workers: int = 0
    settled: bool = False
    _window: tuple[int, float] | None = None  # bytes and time at its start
    #: Samples that only restart the window: a load's start (connections, slow start,
    #: fresh arena pages) and each step's new connections are not counted.
    _skip: int = 2
    _last_rate: float = 0.0
    _before_step: int = 0

    def __post_init__(self) -> None:
        self.ceiling = max(self.ceiling, self.start)
        self.workers = self.start

    def sample(self, total_bytes: int, now: float | None = None) -> int:
        """Called every INTERVAL with the load's bytes so far; returns the new target."""
        now = time.monotonic() if now is None else now
        if self.settled:
            return self.workers
        if self._window is None or self._skip > 0:
            self._window, self._skip = (total_bytes, now), max(self._skip - 1, 0)
            return self.workers
        bytes0, t0 = self._window
        rate = (total_bytes - bytes0) / max(now - t0, 1e-9)
        self._window = (total_bytes, now)
        if rate <= 0:
            # Nothing arrived (a SlowDown pause, a stall): no evidence either way, and
            # 0 >= 0 * (1 + GAIN) would read as a step that paid and double into the storm.
            return self.workers
        if self._before_step and rate < self._last_rate * (1 + GAIN):
            # The last step did not pay: take it back and stay there.
            self.workers, self.settled = self._before_step, True
            return self.workers
        if (self.target_bps and rate >= self.target_bps) or self.workers >= self.ceiling:
            self.settled = True
            return self.workers
        # A step that brought nearly its share (a link that caps each connection) says the
        # next one will too: quadruple, and reach a far store's depth a step sooner.
        linear = self._before_step and rate >= self._last_rate * (1 + LINEAR)
        self._last_rate = rate
        self._before_step = self.workers
        self.workers = min(self.ceiling, self.workers * (4 if linear else 2))
        self._skip = 1
        return self.workers


class _P90:
    """The 90th percentile of a load's samples, recomputed on a thinning schedule."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.value = 0.0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        n = len(self.samples)
        if n >= MIN_SAMPLES and (n <= 64 or n % 16 == 0):
            ordered = sorted(self.samples)
            self.value = ordered[min(n - 1, int(n * 0.9))]


class Hedger:
    """A load's range and first-byte times, and whether a running range is late enough to
    ask again."""

    def __init__(self, ranges: int) -> None:
        self._times = _P90()
        self._first = _P90()
        self.allowed = max(1, int(ranges * HEDGE_SHARE))
        self.hedged = 0
        self.spares = 0
        self.won = 0

    def observe(self, seconds: float) -> None:
        self._times.add(seconds)

    def observe_first_byte(self, seconds: float) -> None:
        self._first.add(seconds)

    def _limit(self, p90: _P90) -> float | None:
        if len(p90.samples) < MIN_SAMPLES or self.hedged >= self.allowed:
            return None
        return max(MIN_HEDGE_SECONDS, p90.value * SLOW)

    def deadline(self) -> float | None:
        """Seconds after which the range being started should be hedged (None: never)."""
        return self._limit(self._times)

    def first_byte_deadline(self) -> float | None:
        """Seconds a sent GET may wait for its first byte before it is hedged (None: never)."""
        return self._limit(self._first)

    def may_start(self) -> bool:
        return self.hedged < self.allowed and self.spares < MAX_SPARES


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
    try:
        if not await _straggles(primary, timing, t0, hedger) or not hedger.may_start():
            await primary
            hedger.observe(time.monotonic() - t0)
            return False
        hedger.hedged += 1
        hedger.spares += 1
        try:
            spare = memoryview(bytearray(len(dest)))
            hedge = asyncio.ensure_future(store.read_into(obj, start, spare))
            tasks.append(hedge)
            winner = await _first_success(primary, hedge)
            if winner is hedge:
                primary.cancel()
                await asyncio.wait([primary])
                dest[:] = spare
                hedger.won += 1
        finally:
            hedger.spares -= 1
        hedger.observe(time.monotonic() - t0)
        return True
    finally:
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
        waits = [INTERVAL]
        deadline = hedger.deadline()
        if deadline is not None:
            if now - t0 >= deadline:
                return True
            waits.append(t0 + deadline - now)
        first_limit = hedger.first_byte_deadline()
        # Not yet sent (a SlowDown pause, a connection being opened): not the store's delay.
        if first_limit is not None and timing.sent is not None and timing.first_byte is None:
            if now - timing.sent >= first_limit:
                return True
            waits.append(timing.sent + first_limit - now)
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
