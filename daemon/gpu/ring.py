"""The pinned ring: N host slots, allocated and registered with CUDA once, at daemon start.

Pinning costs far more than filling (about 1-3 GB/s of registration), so slots are never
pinned per load. A fetcher takes a free slot, receives one range into it, and hands it to
the copy engine; the slot comes back only when the CUDA event recorded after its last H2D
copy has completed (``h2d.CopyEngine``), never when the copy was merely queued: the DMA
reads the slot after the call returns.

The memory is anonymous and private to the daemon: fetchers run on the daemon's event
loop. Fetcher processes would need a /dev/shm file here instead (cudaHostRegister pins
MAP_SHARED memory just as well).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import mmap

from tensorferry.cuda import CudaApi

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Slot:
    index: int
    ptr: int
    view: memoryview
    #: Copies (one per target GPU) still reading the slot.
    pending: int = 0


class PinnedRing:
    def __init__(self, api: CudaApi, slots: int, slot_size: int) -> None:
        self.api = api
        self.slots = slots
        self.slot_size = slot_size
        self._map: mmap.mmap | None = None
        self._anchor: ctypes.c_char | None = None
        self._ptr = 0
        self._all: list[Slot] = []
        self._free: asyncio.Queue[Slot] = asyncio.Queue()

    @property
    def size(self) -> int:
        return self.slots * self.slot_size

    def open(self) -> PinnedRing:
        # MAP_POPULATE: the pages exist before cudaHostRegister pins them.
        self._map = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_POPULATE)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self._ptr = ctypes.addressof(self._anchor)
        try:
            self.api.host_register(self._ptr, self.size)
        except BaseException:
            self._unmap()
            raise
        whole = memoryview(self._map)
        for i in range(self.slots):
            start = i * self.slot_size
            slot = Slot(i, self._ptr + start, whole[start : start + self.slot_size])
            self._all.append(slot)
            self._free.put_nowait(slot)
        whole.release()
        log.info("pinned ring: %d slots of %d bytes (%s)", self.slots, self.slot_size,
                 self.api.name)  # fmt: skip
        return self

    async def acquire(self) -> Slot:
        """A free slot, waiting (FIFO) until one comes back. Cancellation-safe: a slot is
        taken from the queue only by a waiter that then returns it."""
        return await self._free.get()

    def release(self, slot: Slot) -> None:
        """Give a slot back; callers guarantee no queued copy still reads it."""
        assert slot.pending == 0, f"slot {slot.index} released with {slot.pending} copies queued"
        self._free.put_nowait(slot)

    @property
    def free(self) -> int:
        return self._free.qsize()

    def close(self) -> None:
        """Unregister and unmap; every copy from the ring must be complete by now."""
        if self._map is None:
            return
        if self.free != self.slots:
            log.warning("pinned ring closed with %d slots out", self.slots - self.free)
        try:
            self.api.host_unregister(self._ptr)
        finally:
            for slot in self._all:
                slot.view.release()
            self._all.clear()
            self._unmap()

    def _unmap(self) -> None:
        self._anchor = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A failed fetch's traceback may still hold a slice; GC unmaps it later.
                log.debug("pinned ring still exported; left to the garbage collector")
            self._map = None
