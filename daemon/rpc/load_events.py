"""The events a Load or Preload stream sends while its model loads, and its tensor table.

Every waiter gets ``fetch`` progress. A streamed load (``LoadRequest.stream_tensors``) of a
CPU arena also gets, once the arena exists, the tensor table, the arena's grant and a
``Landed`` event for each batch of tensors complete since the last, so the worker uses
tensors while the rest is fetched. A waiter that joins a load in progress is sent the
tensors that landed before it came in one event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from tensorferry.daemon.arrivals import Arrivals
from tensorferry.daemon.model import Model
from tensorferry.daemon.planner import Plan
from tensorferry.v1 import tensorferry_pb2 as pb

TENSORS_PER_MESSAGE = 2000  # ~200 KB per message, far below gRPC's 4 MiB default
PROGRESS_INTERVAL = 0.1


def table_events(plan: Plan) -> Iterator[pb.LoadEvent]:
    """The tensor table, in batches that each fit a gRPC message. Built a batch at a time:
    the stream's writes between batches let the event loop run (200,000 tensors at once
    held it for half a second)."""
    tensors = plan.tensors
    for i in range(0, len(tensors), TENSORS_PER_MESSAGE):
        batch = [
            pb.TensorInfo(
                name=t.name, dtype=t.dtype, shape=t.shape, offset=t.offset, nbytes=t.nbytes
            )
            for t in tensors[i : i + TENSORS_PER_MESSAGE]
        ]
        yield pb.LoadEvent(tensors=pb.TensorBatch(tensors=batch))


class Waiting:
    """One request's view of a load in progress: what it has been sent so far."""

    def __init__(self, model: Model, group: Sequence[Model], stream: bool) -> None:
        self.model = model
        self.group = group
        self.stream = stream
        #: The table and the arena went out: the ready event must not repeat the table.
        self.announced = False
        self.bytes_sent = -1
        self._landed_sent = 0

    async def events(self) -> AsyncIterator[pb.LoadEvent]:
        """Events until every model of the group is done (ready, failed or cancelled)."""
        model = self.model
        while not all(m.done.done() for m in self.group):
            arrivals = model.arrivals if self.stream else None
            if arrivals is None:
                await asyncio.wait([m.done for m in self.group], timeout=PROGRESS_INTERVAL)
            else:
                for event in self._streamed(arrivals):
                    yield event
                await self._wait(arrivals)
            if model.bytes_done != self.bytes_sent:
                self.bytes_sent = model.bytes_done
                progress = pb.Progress(
                    stage="fetch", bytes_done=self.bytes_sent, bytes_total=model.bytes_total
                )
                yield pb.LoadEvent(progress=progress)
        if self.announced and model.arrivals is not None and model.done.done():
            for event in self._streamed(model.arrivals):
                yield event

    def _streamed(self, arrivals: Arrivals) -> Iterator[pb.LoadEvent]:
        if not self.announced:
            self.announced = True
            # The worker maps the arena and may hand out views before it holds a lease: if
            # the model is evicted before the ready event, its pages must never become
            # another model's (a recycled arena).
            self.model.released_early = True
            yield from table_events(arrivals.plan)
            arena = pb.Arena(
                model_id=self.model.id, tensor_count=len(arrivals.plan.tensors),
                **arrivals.grant,
            )  # fmt: skip
            yield pb.LoadEvent(arena=arena)
        done = len(arrivals.order)
        if done > self._landed_sent:
            landed = pb.Landed(tensors=arrivals.order[self._landed_sent : done])
            self._landed_sent = done
            yield pb.LoadEvent(landed=landed)

    async def _wait(self, arrivals: Arrivals) -> None:
        """Until more tensors land, the load ends, or it is time for a progress event."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(arrivals.wait_past(self._landed_sent))
        ]
        try:
            await asyncio.wait(
                [*waits, *(m.done for m in self.group)],
                timeout=PROGRESS_INTERVAL, return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            for w in waits:
                w.cancel()
