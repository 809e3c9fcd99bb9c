"""A load's small reads (safetensors headers, the index, a manifest), retried as its ranges
are: one reset connection or 503 while a header is read must not fail the load and every
worker waiting on it.

The fetch policy applies as it is: attempts per read, full-jitter backoff, the wall-clock
deadline of one attempt, and a retry budget (the policy's, for all of a load's small
reads). Each retry is counted by cause; the plan carries the counts into the load's record.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from tensorferry.daemon.fetch.retries import FetchPolicy, cause, gave_up
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.errors import StoreUnavailable

log = logging.getLogger(__name__)
#: The range size ``[s3] range_deadline`` is meant for (the default chunk).
_RANGE_BYTES = 8 << 20


class Reads:
    """One load's small reads from ``store``, and the retries they took."""

    def __init__(self, store: Store, policy: FetchPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or FetchPolicy()
        self.left = self.policy.budget
        #: Retries by cause, named as the fetch stage names them.
        self.causes: collections.Counter[str] = collections.Counter()

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of ``obj``, asked again after errors that may pass."""
        policy, attempt = self.policy, 0
        # The deadline is one data range's; a 100 MB header gets the time of its size.
        deadline = policy.range_deadline * max(1.0, length / _RANGE_BYTES)
        while True:
            try:
                async with asyncio.timeout(deadline):
                    return await self.store.read(obj, start, length)
            except (StoreUnavailable, TimeoutError) as exc:
                attempt += 1
                what = f"{self.store.describe(obj)} bytes {start}-{start + length - 1}"
                if attempt >= policy.attempts or self.left <= 0:
                    detail = (
                        exc.message
                        if isinstance(exc, StoreUnavailable)
                        else f"{what}: no answer within {deadline:g} s"
                    )
                    raise StoreUnavailable(gave_up(detail, attempt, policy)) from exc
                self.left -= 1
                self.causes[cause(exc)] += 1
                log.info("retrying %s (attempt %d): %s", what, attempt + 1, exc)
                await asyncio.sleep(policy.delay(attempt))
