"""Host-to-device copies from ring slots into GPU arenas, on several streams per GPU.

``submit`` queues a slot's copies to every target arena (one fetch feeds several GPUs)
and records one event per target after them. Each stream has a thread that waits for its
events in order (a stream completes its work in order; different streams do not) and
reports each completion to the event loop, which returns the slot to the ring once the
copies to every target are done, and lets an arena released meanwhile be freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

from tensorferry.cuda import CudaApi, CudaError, DeviceInfo, Event, Stream
from tensorferry.daemon.gpu.layout import Piece
from tensorferry.daemon.gpu.ring import PinnedRing, Slot
from tensorferry.daemon.sinks.cuda import CudaArena

log = logging.getLogger(__name__)
_Item = tuple[Event, Slot, CudaArena]


@dataclasses.dataclass(eq=False)
class _Lane:
    """One copy stream and the thread that waits for its events."""

    stream: Stream
    waiting: queue.SimpleQueue[_Item | None]
    thread: threading.Thread | None = None


class CopyEngine:
    def __init__(
        self, api: CudaApi, devices: Sequence[DeviceInfo], rings: Sequence[PinnedRing],
        streams: int,
    ) -> None:  # fmt: skip
        self.api = api
        #: Slot indices are unique across the rings: events are kept per (GPU, index).
        self._slots = sum(r.slots for r in rings)
        self._devices = list(devices)
        self._streams = streams
        self._lanes: dict[int, list[_Lane]] = {}
        self._turn: dict[int, Iterator[_Lane]] = {}
        #: One event per (GPU, slot): a slot is not reused before its events complete.
        self._events: dict[int, list[Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> CopyEngine:
        """Bind to the running loop and open the devices given at construction (the
        daemon gives none: it opens each at its first load, ``open_device``)."""
        self._loop = asyncio.get_running_loop()
        for d in self._devices:
            self.open_device(d)
        return self

    def opened(self, ordinal: int) -> bool:
        return ordinal in self._lanes

    def lanes(self, ordinal: int) -> list[_Lane]:
        return self._lanes.get(ordinal, [])

    def open_device(self, d: DeviceInfo) -> None:
        """The device's streams, events and waiting threads (its CUDA context comes with
        the first stream). Blocking; callable off the loop's thread, once per device. On a
        failure what was made is destroyed, so that the next load's try starts clean."""
        assert self._loop is not None
        assert d.ordinal not in self._lanes
        lanes: list[_Lane] = []
        events: list[Event] = []
        try:
            for _ in range(self._streams):
                lanes.append(_Lane(self.api.stream_create(d.ordinal), queue.SimpleQueue()))
            for _ in range(self._slots):
                events.append(self.api.event_create(d.ordinal))
        except BaseException:
            self._destroy(lanes, events)
            raise
        self._events[d.ordinal] = events
        for i, lane in enumerate(lanes):
            lane.thread = threading.Thread(
                target=self._wait, args=(lane,), name=f"h2d-{d.ordinal}-{i}", daemon=True
            )
            lane.thread.start()
        self._turn[d.ordinal] = itertools.cycle(lanes)
        self._lanes[d.ordinal] = lanes  # last: ``opened`` says the device is ready

    def _destroy(self, lanes: Sequence[_Lane], events: Sequence[Event]) -> None:
        for event in events:
            try:
                self.api.event_destroy(event)
            except CudaError as exc:
                log.warning("destroying a CUDA event failed: %s", exc)
        for lane in lanes:
            try:
                self.api.stream_destroy(lane.stream)
            except CudaError as exc:
                log.warning("destroying a CUDA stream failed: %s", exc)

    def submit(self, slot: Slot, pieces: Sequence[Piece], arenas: Sequence[CudaArena]) -> None:
        """Queue the slot's copies to each arena; the engine owns the slot from here on
        and gives it back to the ring when every copy is done (at once if none was queued)."""
        assert slot.pending == 0
        try:
            for arena in arenas:
                lane = next(self._turn[arena.ordinal])
                queued = False
                try:
                    for p in pieces:
                        self.api.memcpy_h2d_async(
                            arena.ptr + p.dst, slot.ptr + p.src, p.nbytes, lane.stream
                        )
                        queued = True
                finally:
                    if queued:
                        self._fence(lane, slot, arena)
        finally:
            if slot.pending == 0:
                slot.ring.release(slot)

    def _fence(self, lane: _Lane, slot: Slot, arena: CudaArena) -> None:
        event = self._events[arena.ordinal][slot.index]
        try:
            self.api.event_record(event, lane.stream)
        except CudaError:
            # Without the event nothing tells when the copies end: wait for the stream.
            self.api.stream_synchronize(lane.stream)
            raise
        slot.pending += 1
        arena.copy_queued()
        lane.waiting.put((event, slot, arena))

    def _wait(self, lane: _Lane) -> None:
        assert self._loop is not None
        try:
            # This thread's every call is for the lane's device: without a device of its
            # own, its first CUDA call would create a context on device 0.
            self.api.bind_thread(lane.stream.ordinal)
        except CudaError as exc:
            log.error("binding cuda:%d to its copy thread failed: %s", lane.stream.ordinal, exc)
        while (item := lane.waiting.get()) is not None:
            event, slot, arena = item
            error: BaseException | None = None
            try:
                self.api.event_synchronize(event)
            except CudaError as exc:
                # The copy will not run (a sticky error): the slot is free again, and the
                # load learns of it when it settles the arena.
                error = exc
            try:
                self._loop.call_soon_threadsafe(self._finished, slot, arena, error)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                return

    def _finished(self, slot: Slot, arena: CudaArena, error: BaseException | None) -> None:
        if error is not None:
            log.error("H2D copy into %s failed: %s", arena.name, error)
        slot.pending -= 1
        if slot.pending == 0:
            slot.ring.release(slot)
        arena.copy_finished(error)

    async def settle(self, arenas: Iterable[CudaArena]) -> None:
        """Return once every copy into the arenas is complete and their streams are
        synchronised: only then may a worker see them. Raises a copy's CUDA error."""
        arenas = list(arenas)
        for arena in arenas:
            await arena.idle.wait()
        for arena in arenas:
            if arena.error is not None:
                raise arena.error
        ordinals = sorted({a.ordinal for a in arenas})
        await asyncio.to_thread(self._synchronize, ordinals)

    def _synchronize(self, ordinals: Iterable[int]) -> None:
        for ordinal in ordinals:
            for lane in self._lanes[ordinal]:
                self.api.stream_synchronize(lane.stream)

    def close(self) -> None:
        """Wait for every queued copy, then stop the waiting threads (daemon exit)."""
        for ordinal in self._lanes:
            with contextlib.suppress(CudaError):
                self._synchronize([ordinal])
        for lanes in self._lanes.values():
            for lane in lanes:
                lane.waiting.put(None)
        for lanes in self._lanes.values():
            for lane in lanes:
                if lane.thread is not None:
                    lane.thread.join()
        for ordinal, lanes in self._lanes.items():
            self._destroy(lanes, self._events.pop(ordinal, []))
        self._lanes.clear()
