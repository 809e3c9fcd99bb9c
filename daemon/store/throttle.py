"""One back-off state per bucket, shared by every load of this daemon.

S3 answers 503 SlowDown per prefix and bucket when the request rate is too high. Each load
retrying on its own clock would keep the rate up: every load on the host hammering the
same bucket. Instead a SlowDown pauses new GETs to that bucket from all loads, for a
jittered delay that doubles with each SlowDown in a row and halves with each success.
"""

from __future__ import annotations

import asyncio
import random
import time

#: First pause after a SlowDown, and the longest.
MIN_PAUSE = 0.2
MAX_PAUSE = 5.0


class BucketThrottle:
    def __init__(self) -> None:
        self.until = 0.0
        self.delay = 0.0
        #: SlowDowns seen (Status shows the sum over buckets).
        self.slowdowns = 0

    async def wait(self) -> None:
        """Until the bucket's pause (if any) is over."""
        # The pause may be extended while we sleep (another SlowDown): look again, a few
        # times at most; a store that keeps answering SlowDown fails the GET instead.
        for _ in range(4):
            left = self.until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)

    def slow_down(self) -> None:
        self.slowdowns += 1
        self.delay = min(MAX_PAUSE, max(MIN_PAUSE, self.delay * 2))
        # Half to all of the delay: hosts and loads that saw it together resume apart.
        pause = random.uniform(self.delay / 2, self.delay)
        self.until = max(self.until, time.monotonic() + pause)

    def ok(self) -> None:
        self.delay = self.delay / 2 if self.delay > MIN_PAUSE else 0.0


class Throttles(dict[str, BucketThrottle]):
    """The daemon's throttles by bucket (one S3 backend per daemon holds them)."""

    def of(self, bucket: str) -> BucketThrottle:
        throttle = self.get(bucket)
        if throttle is None:
            throttle = self[bucket] = BucketThrottle()
        return throttle

    @property
    def slowdowns(self) -> int:
        return sum(t.slowdowns for t in self.values())
