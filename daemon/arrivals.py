"""Which tensors of a loading model are complete, in the order they completed.

A worker that streams a load (``LoadRequest.stream_tensors``) maps the arena as soon as it
exists and is told each tensor once every byte of it has landed, so an engine copies
weights into its parameters while the rest is still being fetched. Ranges land out of
order (N GETs in flight, retries), and a tensor may span many ranges or share one with
others: each landed range takes its bytes off every tensor it overlaps.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Any

from tensorferry.daemon.planner import Plan


class Arrivals:
    """Complete tensors (indexes into ``plan.tensors``) of one arena, as ranges land.

    Runs on the event loop: ``landed`` is called by the fetch workers, ``wait_past`` by
    the streams that forward the order to workers.
    """

    def __init__(self, plan: Plan, grant: dict[str, Any]) -> None:
        self.plan = plan
        #: The arena's grant (``ShmArena.grant``): what a streaming worker maps.
        self.grant = grant
        tensors = plan.tensors
        self._by_offset = sorted(range(len(tensors)), key=lambda i: tensors[i].offset)
        self._starts = [tensors[i].offset for i in self._by_offset]
        self._missing = [t.nbytes for t in tensors]
        #: Indexes of the complete tensors, in the order they completed.
        self.order: list[int] = [i for i, t in enumerate(tensors) if t.nbytes == 0]
        self._changed = asyncio.Event()
        self.finished = False

    def landed(self, arena_offset: int, length: int) -> None:
        """Bytes ``[arena_offset, arena_offset + length)`` of the arena are in place."""
        end = arena_offset + length
        tensors = self.plan.tensors
        # The last tensor starting before the range may reach into it.
        k = max(bisect.bisect_right(self._starts, arena_offset) - 1, 0)
        grew = False
        while k < len(self._by_offset) and self._starts[k] < end:
            i = self._by_offset[k]
            t = tensors[i]
            overlap = min(end, t.offset + t.nbytes) - max(arena_offset, t.offset)
            if overlap > 0 and self._missing[i] > 0:
                self._missing[i] -= overlap
                if self._missing[i] <= 0:
                    self.order.append(i)
                    grew = True
            k += 1
        if grew:
            self._changed.set()

    def finish(self) -> None:
        """The load ended (ready, failed or cancelled): wake every stream for good."""
        self.finished = True
        self._changed.set()

    async def wait_past(self, seen: int) -> None:
        """Until more than ``seen`` tensors are complete, or the load has ended."""
        while len(self.order) <= seen and not self.finished:
            self._changed.clear()
            await self._changed.wait()
