"""An arena's memory reserved alongside the fetch, not before its first GET.

A fresh tmpfs page costs more to allocate, zero and map than its bytes cost to receive
(~0.5-0.9 CPU-s per GiB here against ~0.3), and doing all of it before the first GET put
that time in front of every fresh daemon's first load. A ``Reservation`` fallocates and
populates (``MADV_POPULATE_WRITE``) the arena region by region in offset order, in a
thread, while the fetch runs; the scheduler hands out ranges in that same order and each
range waits only for the region under it (``ready``).

The guarantee ``posix_fallocate`` gave up front holds per region: tmpfs never says ENOSPC
on a write, it SIGBUSes (or brings the OOM killer), so no range is written before its
region is allocated, and an allocation that fails fails the load with ResourceExhausted.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import heapq
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable

from tensorferry.daemon.tasks import task_group
from tensorferry.daemon.threads import run_to_end
from tensorferry.errors import InternalError, ResourceExhausted, TensorferryError

log = logging.getLogger(__name__)
#: Bytes fallocated and populated per step: the first range waits for one (~15 ms), and a
#: stop is seen within one.
REGION = 16 << 20
#: Threads that reserve one arena, each taking the next region: one populates ~1-2 GB/s
#: here, less than a 100 Gb/s NIC brings, so a host with cores to spare uses several.
THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Linux 5.14+
_libc = ctypes.CDLL(None, use_errno=True)
# Through ctypes, not mmap.madvise: a foreign call drops the GIL, and the event loop must
# run while a region is populated.
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _fallocate(fd: int, offset: int, length: int) -> None:
    # A module function, looked up per region: tests make it fail (ENOSPC) or hold it.
    os.posix_fallocate(fd, offset, length)


def address_of(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts; valid while it is neither closed nor resized."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # the export would block close() and resize()


class Reservation:
    """Allocates and maps bytes ``[start, size)`` of one arena, ahead of the fetch.

    ``run`` does the work (in ``THREADS`` threads, waited for on cancel: ``run_to_end``)
    and closes ``fd``; ``ready(end)`` returns once ``[0, end)`` is reserved. Whoever
    created it runs ``run`` beside the fetch and maps or unmaps the arena only when ``run``
    has returned.
    """

    def __init__(
        self, fd: int, address: int, start: int, size: int, *,
        refuse: Callable[[int], ResourceExhausted],
    ) -> None:  # fmt: skip
        self._fd: int | None = fd
        self._address = address
        self.size = size
        #: ``[0, reserved)`` is allocated and mapped (as the event loop has been told).
        self.reserved = start
        #: When the last region was reserved (``time.monotonic``), 0.0 until then.
        self.finished = time.monotonic() if start >= size else 0.0
        self._refuse = refuse
        self._halt = threading.Event()
        self._claim = threading.Lock()
        self._next = start  # the next region a thread takes
        self._landed: dict[int, int] = {}  # regions reserved past ``reserved``: start -> end
        self._pages = True  # MADV_POPULATE_WRITE works (Linux 5.14+)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Seconds to pause after each region: tests only (``env.WARM_PACE``), to see a
        #: warm pool part-populated on any machine. A stop or a cancel ends the pause.
        self.pace = 0.0

    @property
    def done(self) -> bool:
        return self.reserved >= self.size

    def stop(self) -> None:
        """Ask ``run`` to return after the region in progress (the warm pool yields)."""
        self._halt.set()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def ready(self, end: int) -> None:
        """Until ``[0, end)`` is reserved; raises what failed the reservation."""
        if self._error is not None:
            raise self._error
        if end <= self.reserved:
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (end, id(future), future))
        await future

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        threads = min(THREADS, -(-(self.size - self._next) // REGION)) or 1
        try:
            # One failed thread stops the others (each waited for) and fails the load.
            async with task_group() as tg:
                for _ in range(threads):
                    tg.create_task(run_to_end(self._populate))
        except OSError as exc:
            # ENOSPC, or ENOMEM from a tmpfs past its size: what posix_fallocate said up
            # front before, said now for the region the fetch was about to reach.
            log.warning("reserving arena memory failed at byte %d: %s", self.reserved, exc)
            refused = self._refuse(self.reserved)
            self._fail(refused)
            raise refused from exc
        except BaseException:
            self._fail(self._stopped("was cancelled"))
            raise
        finally:
            self.close()
        if not self.done:  # stopped early: a waiter now would never be woken
            self._fail(self._stopped("was stopped"))

    def _take(self) -> tuple[int, int] | None:
        with self._claim:
            at = self._next
            if at >= self.size or self._halt.is_set():
                return None
            self._next = min(at + REGION, self.size)
            return at, self._next - at

    def _populate(self, stop: threading.Event) -> None:
        assert self._fd is not None
        assert self._loop is not None
        while not stop.is_set() and (region := self._take()) is not None:
            at, n = region
            _fallocate(self._fd, at, n)
            if self._pages and _libc.madvise(self._address + at, n, _MADV_POPULATE_WRITE):
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise OSError(err, os.strerror(err))
                self._pages = False  # an older kernel: the fetch faults the pages in itself
            self._loop.call_soon_threadsafe(self._advance, at, at + n)
            paused_until = time.monotonic() + self.pace
            while not (stop.is_set() or self._halt.is_set()) and time.monotonic() < paused_until:
                self._halt.wait(min(0.05, self.pace))

    def _advance(self, at: int, end: int) -> None:
        self._landed[at] = end
        while self.reserved in self._landed:
            self.reserved = self._landed.pop(self.reserved)
        if self.reserved >= self.size:
            self.finished = time.monotonic()
        while self._waiters and self._waiters[0][0] <= self.reserved:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _stopped(self, how: str) -> InternalError:
        return InternalError(
            f"arena reservation {how} at byte {self.reserved} of {self.size}: the ranges "
            "past it have no memory under them; load the model again"
        )

    def _fail(self, exc: TensorferryError) -> None:
        """Wake every waiter with ``exc``: a typed failure, never a fabricated
        CancelledError (a TaskGroup counts that as cancelled, not failed, and would return
        as if the ranges behind it had landed)."""
        self._error = exc
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(exc)
        self._waiters.clear()
