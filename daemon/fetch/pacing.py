"""How many range GETs a load keeps in flight.

Object stores serve each connection at a fraction of a host's link (S3: ~90 MB/s, 20-60
ms to first byte, a long tail), so the number of GETs in flight decides what a load
reaches. ``Pace`` starts at ``s3.concurrency`` and, while throughput keeps rising with
each step, doubles the workers (quadruples after a step that nearly doubled throughput)
up to ``s3.max_concurrency`` (or until ``s3.target_rate``);
a step that brought less than ``GAIN`` more is taken back, and growth stops there: more
would only queue. On loopback, where a core is the limit, the first step is taken back.
When the load's first half second says the link (``daemon.fetch.link``) needs at least ``JUMP``
times the starting GETs (the per-connection rate times the GETs falls that far short of
the link's rate), the first step goes straight there: on a far store each doubling costs
about a second. SlowDowns (503) from the store halve the GETs in flight and stop growth:
there the store, not the link, is the limit.

Stragglers are hedged in ``daemon.fetch.hedging``.
"""

from __future__ import annotations

import dataclasses
import math
import time

#: A growth step (doubling the GETs in flight) must raise throughput by this much to stay:
#: on a link that limits each connection it brings +100%; where a core is the limit, a few
#: percent, and ramp-up noise must not pass for a gain.
GAIN = 0.3
#: A doubling that raised throughput by this much (a jump: its share of this) found a link
#: that caps each connection: the next step quadruples.
LINEAR = 0.8
#: The first step jumps to what the link's rate needs when that is at least this multiple
#: of the start: a smaller shortfall may be the load's start-up (connections, fresh pages)
#: or a busy core, and doubling finds it as cheaply.
JUMP = 4.0
#: SlowDowns since the last shedding that halve the GETs in flight (a lone 503 in a long
#: load is noise; a throttled prefix answers hundreds).
SHED_AFTER = 3
#: Seconds between throughput samples.
INTERVAL = 0.5


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
    #: Bytes per second the host's link is believed to carry (0: unknown, no jump).
    link_bps: float = 0.0
    #: When the load started (``time.monotonic()``): the first sample measures from there
    #: to decide on a jump. None: no jump.
    started: float | None = None
    workers: int = 0
    settled: bool = False
    _window: tuple[int, float] | None = None  # bytes and time at its start
    #: Samples that only restart the window: a load's start (connections, slow start,
    #: fresh arena pages) and each step's new connections are not counted.
    _skip: int = 2
    _last_rate: float = 0.0
    _before_step: int = 0
    _jumped: bool = False  # the step being judged was a jump
    _slowdowns: int = 0  # SlowDowns counted up to the last shedding
    #: Why the target last changed, for the log.
    reason: str = ""

    def __post_init__(self) -> None:
        self.ceiling = max(self.ceiling, self.start)
        self.workers = self.start

    def sample(self, total_bytes: int, now: float | None = None, slowdowns: int = 0) -> int:
        """Called every INTERVAL with the load's bytes and 503 SlowDowns so far; returns
        the new target."""
        now = time.monotonic() if now is None else now
        if slowdowns - self._slowdowns >= SHED_AFTER:
            return self._shed(slowdowns)
        if self.settled:
            return self.workers
        if self.started is not None and total_bytes > 0:  # none yet: ask again next time
            rate, self.started = total_bytes / max(now - self.started, 1e-9), None
            jump = self._jump(rate)
            if jump:
                # Judged like any step: the next window must beat this one by GAIN.
                self.reason = (
                    f"a jump: {rate / 1e6:.1f} MB/s from {self.workers} GETs, "
                    f"the link takes {self.link_bps / 1e6:.0f} MB/s"
                )
                self._last_rate, self._before_step, self.workers = rate, self.workers, jump
                self._jumped = True
                self._window, self._skip = (total_bytes, now), 1
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
            if self._jumped:
                # The link is not what it was believed to be (or the store throttles):
                # back to the start, and find the depth one doubling at a time.
                self.workers, self._before_step, self._jumped = self._before_step, 0, False
                self._skip = 1
                self.reason = f"the jump did not pay ({rate / 1e6:.1f} MB/s): doubling instead"
                return self.workers
            # The last step did not pay: take it back and stay there.
            self.workers, self.settled = self._before_step, True
            self.reason = f"the step did not pay ({rate / 1e6:.1f} MB/s): settled"
            return self.workers
        if (self.target_bps and rate >= self.target_bps) or self.workers >= self.ceiling:
            self.settled = True
            return self.workers
        # A step that brought nearly its share (a link that caps each connection) says the
        # next one will too: quadruple, and reach a far store's depth a step sooner.
        step = self.workers / self._before_step if self._before_step else 0.0
        linear = step > 0 and rate >= self._last_rate * (1 + LINEAR * (step - 1))
        self._last_rate, self._jumped = rate, False
        self._before_step = self.workers
        self.workers = min(self.ceiling, self.workers * (4 if linear else 2))
        self._skip = 1
        self.reason = f"{rate / 1e6:.1f} MB/s and rising"
        return self.workers

    def _shed(self, slowdowns: int) -> int:
        """The store refuses GETs: halve those in flight (not below the start) and grow no
        more. Every load (and host) refused in proportion to what it sends gives up in
        proportion: one that jumped or grew early keeps no larger share of the bucket."""
        self.reason = f"{slowdowns - self._slowdowns} SlowDowns from the store: settled"
        self._slowdowns, self.settled = slowdowns, True
        self.workers = max(self.start, self.workers // 2)
        return self.workers

    def _jump(self, rate: float) -> int:
        """The GETs in flight the link's rate needs at ``rate`` for the current ones, if
        that is a jump worth taking now; else 0."""
        if not self.link_bps or rate <= 0 or self.workers >= self.ceiling:
            return 0
        want = math.ceil(self.workers * self.link_bps / rate)
        return min(self.ceiling, want) if want >= self.workers * JUMP else 0
