"""A pinned ring: N host slots, allocated and registered with CUDA once, at the first load
onto one of its GPUs (never at daemon start: registering creates a CUDA context).

Pinning costs far more than filling (about 1-3 GB/s of registration), so slots are never
pinned per load. A fetcher takes a free slot, receives one range into it, and hands it to
the copy engine; the slot comes back only when the CUDA event recorded after its last H2D
copy has completed (``h2d.CopyEngine``), never when the copy was merely queued: the DMA
reads the slot after the call returns.

The memory is a memfd mapped MAP_SHARED (cudaHostRegister pins shared memory as it pins
private memory), so that fetch processes given ``fd`` can write ranges into the slots the
daemon registered. The memfd is sealed against resizing: a process holding the fd cannot
shrink it under the daemon's mapping (its next touch would be SIGBUS) or the GPU's DMA.
A host with GPUs on several NUMA nodes has one ring per node (``rings.RingSet``); a ring's
pages are first touched on its node's CPUs (``numa``).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import fcntl
import logging
import mmap
import os

from tensorferry.cuda import CudaApi
from tensorferry.daemon.gpu import numa

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Slot:
    #: Unique across the daemon's rings: the copy engine keeps one event per slot and GPU.
    index: int
    ptr: int
    view: memoryview
    #: The ring it goes back to.
    ring: PinnedRing
    #: Copies (one per target GPU) still reading the slot.
    pending: int = 0

    @property
    def offset(self) -> int:
        """Where the slot starts in the ring's memfd (``ring.fd``)."""
        return self.ptr - self.ring.ptr


class PinnedRing:
    def __init__(
        self, api: CudaApi, slots: int, slot_size: int, *, node: int = -1, first: int = 0,
        cpus: frozenset[int] = frozenset(),
    ) -> None:  # fmt: skip
        self.api = api
        #: The CPUs its pages are first touched on (empty: anywhere).
        self.cpus = cpus
        self.slots = slots
        self.slot_size = slot_size
        #: The NUMA node its pages were first touched on (-1: wherever the kernel chose).
        self.node = node
        self.first = first  # the index of its first slot
        #: The memfd behind the ring (-1 before ``open``): for processes that fill slots.
        self.fd = -1
        #: Its base address in this process.
        self.ptr = 0
        #: Slots handed out since start.
        self.taken = 0
        self._map: mmap.mmap | None = None
        #: The device whose context registered the ring: it is unregistered in that one.
        self._ordinal: int | None = None
        self._anchor: ctypes.c_char | None = None
        self._all: list[Slot] = []
        self._free: asyncio.Queue[Slot] = asyncio.Queue()

    @property
    def size(self) -> int:
        return self.slots * self.slot_size

    @property
    def pinned(self) -> bool:
        return self._map is not None

    @property
    def is_open(self) -> bool:
        """Pinned and its slots handed out."""
        return bool(self._all)

    def open(self, cpus: frozenset[int] | None = None, *, ordinal: int | None = None) -> PinnedRing:
        """Map, populate (on ``cpus``, default ``self.cpus``: the node's) and register the
        ring in ``ordinal``'s context, then hand out its slots: on the event loop's thread."""
        self.pin(cpus, ordinal=ordinal)
        self.hand_out()
        return self

    def pin(self, cpus: frozenset[int] | None = None, *, ordinal: int | None = None) -> None:
        """The slow half of ``open`` (seconds per GB), safe off the event loop's thread."""
        cpus = self.cpus if cpus is None else cpus
        self._map = numa.on_cpus(cpus, self._populate) if cpus else self._populate()
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.ptr = ctypes.addressof(self._anchor)
        try:
            self.api.host_register(self.ptr, self.size, ordinal)
        except BaseException:
            self._unmap()
            raise
        self._ordinal = ordinal

    def hand_out(self) -> None:
        """Put the pinned ring's slots in its free queue (an asyncio queue: loop thread)."""
        assert self._map is not None
        assert not self._all
        whole = memoryview(self._map)
        for i in range(self.slots):
            start = i * self.slot_size
            view = whole[start : start + self.slot_size]
            slot = Slot(self.first + i, self.ptr + start, view, self)
            self._all.append(slot)
            self._free.put_nowait(slot)
        whole.release()
        log.info("pinned ring%s: %d slots of %d bytes (%s, memfd %d)",
                 f" on NUMA node {self.node}" if self.node >= 0 else "", self.slots,
                 self.slot_size, self.api.name, self.fd)  # fmt: skip

    def _populate(self) -> mmap.mmap:
        name = f"tensorferry-ring-node{self.node}" if self.node >= 0 else "tensorferry-ring"
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, self.size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)  # fmt: skip
            # MAP_POPULATE: the pages exist (on this thread's node) before they are pinned.
            mapped = mmap.mmap(fd, self.size, mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return mapped

    async def acquire(self) -> Slot:
        """A free slot, waiting (FIFO) until one comes back. Cancellation-safe: a slot is
        taken from the queue only by a waiter that then returns it."""
        slot = await self._free.get()
        self.taken += 1
        return slot

    def release(self, slot: Slot) -> None:
        """Give a slot back; callers guarantee no queued copy still reads it."""
        assert slot.pending == 0, f"slot {slot.index} released with {slot.pending} copies queued"
        assert slot.ring is self, f"slot {slot.index} released to another ring"
        self._free.put_nowait(slot)

    @property
    def free(self) -> int:
        return self._free.qsize()

    def close(self) -> None:
        """Unregister and unmap; every copy from the ring must be complete by now."""
        if self._map is None:
            return
        if self.is_open and self.free != self.slots:
            log.warning("pinned ring closed with %d slots out", self.slots - self.free)
        try:
            self.api.host_unregister(self.ptr, self._ordinal)
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
        if self.fd >= 0:
            # The mapping keeps the memory; a fetch process's copy of the fd keeps it too.
            os.close(self.fd)
            self.fd = -1
