"""How a load retries: its fetch policy (attempts, backoff, deadlines, the pace's bounds),
the per-load retry budget, and the words for a read that is given up. Shared by the range
worker (``fetch``) and a load's small reads (``reads``: headers, index, manifest)."""

from __future__ import annotations

import dataclasses
import random

from tensorferry.daemon.config.keys import default


@dataclasses.dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """How a load fetches: retries and deadlines, how far its GETs in flight may grow
    (``pacing.Pace``) and whether stragglers are hedged (``hedging.Hedger``)."""

    #: Attempts per range, the first included.
    attempts: int = default("s3.attempts")
    #: Retries allowed per load, on top of one per 8 ranges (a few flaky ranges are
    #: normal; hundreds mean the store is down and the load should fail fast).
    budget: int = default("s3.retry_budget")
    base_delay: float = 0.05
    max_delay: float = 2.0
    #: Wall-clock limit for one attempt at one range.
    range_deadline: float = default("s3.range_deadline")
    #: Workers the load may grow to (0 or below the start: a fixed number).
    max_concurrency: int = default("s3.max_concurrency")
    #: Bytes per second at which growth stops (0: while it pays).
    target_rate: int = default("s3.target_rate")
    #: Bytes per second the host's link is believed to carry (``daemon.fetch.link``): the first
    #: step may jump to the GETs in flight it needs. 0: doubling only.
    link_rate: float = 0.0
    hedge: bool = default("s3.hedge")

    def delay(self, attempt: int) -> float:
        # "Full jitter": spreads retries of many ranges that failed together.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def gave_up(detail: str, attempt: int, policy: FetchPolicy) -> str:
    """The message of a read that is not tried again: why, unless nothing was to be retried."""
    if attempt >= policy.attempts == 1:
        return detail  # [s3] attempts = 1: the first error is the whole story
    reason = "attempts" if attempt >= policy.attempts else "the load's retry budget"
    tries = f"{attempt} attempt" + ("s" if attempt != 1 else "")
    return f"{detail} (gave up after {tries}; {reason} exhausted)"


def cause(exc: BaseException) -> str:
    message = str(exc)
    for marker in ("Content-Range", "Content-Length", "timed out", "HTTP 5", "Connection"):
        if marker in message:
            return marker.lower().replace(" ", "-")
    return type(exc).__name__


class Budget:
    def __init__(self, total: int) -> None:
        self.left = total
