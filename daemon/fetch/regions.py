"""Memory a fetch worker process may write into: the daemon's shared file mappings.

A range's destination is a slice of a CPU arena (a /dev/shm file mapped MAP_SHARED) or of
another shareable buffer. The daemon names it to a worker as (region, offset, length);
the worker maps each region once, from a file descriptor passed with SCM_RIGHTS, and
unmaps it when the daemon drops the region. A destination outside every shareable mapping
(a hedge's spare buffer, a ring in private memory) is no region: the daemon fetches it
itself.

The daemon learns a mapping's file from /proc/self/maps, once per mapping, so the arenas
need not announce themselves; an mmap that is closed, collected, moved or resized (a
recycled arena grown with mremap) is a new region, and the old one is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import itertools
import logging
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Callable

from tensorferry.errors import InternalError

log = logging.getLogger(__name__)
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it
_PAGE = mmap.PAGESIZE
#: Ranges a worker remembers having filled page tables for, per region.
_REMEMBERED = 1 << 16


def address(buffer: memoryview | mmap.mmap) -> int:
    """Where a writable buffer's first byte is in this process."""
    holder = ctypes.c_char.from_buffer(buffer)  # an export while it lives: dropped at once
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


@dataclasses.dataclass(eq=False)
class Region:
    rid: int
    base: int
    size: int
    #: The mapped file, open while the region lives (a restarted worker maps it again).
    fd: int
    ref: weakref.ref[mmap.mmap]


def _mapped_file(base: int, size: int) -> tuple[str, int, int] | None:
    """The file mapped shared at ``base`` from offset 0 over ``size`` bytes: (path as
    /proc/self/maps shows it, device, inode)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, _, end = fields[0].partition("-")
            if int(start, 16) != base:
                continue
            if len(fields) < 6 or fields[1][3] != "s" or int(fields[2], 16) != 0:
                return None
            path = fields[5].rstrip("\n")
            if int(end, 16) - base < size or int(fields[4]) == 0:
                return None
            major, _, minor = fields[3].partition(":")
            return path, os.makedev(int(major, 16), int(minor, 16)), int(fields[4])
    return None


def _open_again(path: str, dev: int, inode: int) -> int | None:
    """A new descriptor of the mapped file: by its path (an arena in /dev/shm), else a
    duplicate of one this process still holds (a memfd: the GPU ring's has no name)."""
    if not path.endswith(" (deleted)"):
        with contextlib.suppress(OSError):
            st = os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, inode):
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (dev, inode):
                    return fd
                os.close(fd)  # renamed over between the two looks
    try:
        held = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    for n in held:
        try:
            st = os.fstat(n)
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (dev, inode):
            continue
        with contextlib.suppress(OSError):
            if fcntl.fcntl(n, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR:
                return fcntl.fcntl(n, fcntl.F_DUPFD_CLOEXEC, 0)
    return None


class Regions:
    """The daemon's side: the shareable mappings that destinations have fallen in."""

    def __init__(self, dropped: Callable[[Region], None]) -> None:
        #: Told of each region as it goes, to unmap it in every worker that mapped it.
        self._dropped = dropped
        self._by_mapping: dict[int, Region] = {}  # id() of the mmap
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop (and its thread) that owns the regions: a mapping collected on another
        thread has its region dropped there."""
        self._loop, self._thread = loop, threading.get_ident()

    def find(self, dest: memoryview) -> tuple[Region, int] | None:
        """The region ``dest`` lies in and its offset there, or None (not shareable)."""
        mapping = dest.obj
        if not isinstance(mapping, mmap.mmap) or mapping.closed or dest.readonly:
            return None
        base, size = address(mapping), len(mapping)
        region = self._by_mapping.get(id(mapping))
        if region is not None and (
            region.ref() is not mapping or region.base != base or region.size != size
        ):
            self.drop(region)
            region = None
        if region is None:
            region = self._register(mapping, base, size)
            if region is None:
                return None
        offset = address(dest) - base
        if not 0 <= offset <= size - len(dest):
            return None
        return region, offset

    def _register(self, mapping: mmap.mmap, base: int, size: int) -> Region | None:
        found = _mapped_file(base, size)
        if found is None:
            return None
        fd = _open_again(*found)
        if fd is None:
            return None
        key = id(mapping)
        region = Region(next(self._ids), base, size, fd, weakref.ref(mapping))
        # The region goes with its mapping: an arena freed and collected must not stay
        # mapped in the workers, nor its file held open here.
        weakref.finalize(mapping, self._collected, key, region)
        self._by_mapping[key] = region
        return region

    def _collected(self, key: int, region: Region) -> None:
        if self._by_mapping.get(key) is region:
            self.drop(region)

    def sweep(self) -> None:
        """Drop the regions of mappings closed since (collected ones go by themselves)."""
        for region in list(self._by_mapping.values()):
            mapping = region.ref()
            if mapping is None or mapping.closed:
                self.drop(region)

    def drop(self, region: Region) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._thread:
            # A collection on another thread ran the mapping's finalizer: the table and the
            # descriptor are the loop's (a close here could race one there, and close an fd
            # number reused meanwhile).
            try:
                loop.call_soon_threadsafe(self.drop, region)
                return
            except RuntimeError:  # the loop is closed: nothing runs there any more
                pass
        for key, known in list(self._by_mapping.items()):
            if known is region:
                del self._by_mapping[key]
        if region.fd >= 0:
            os.close(region.fd)
            region.fd = -1
            self._dropped(region)

    def close(self) -> None:
        for region in list(self._by_mapping.values()):
            self.drop(region)

    def __len__(self) -> int:
        return len(self._by_mapping)


class Mapped:
    """A worker's side: the regions it has mapped, by id."""

    def __init__(self, receive_fd: Callable[[], tuple[int, int, int] | None]) -> None:
        #: The next (region id, size, fd) the daemon sent, or None when none is waiting:
        #: never blocks (the daemon sends a region's fd before the first GET naming it).
        self._receive_fd = receive_fd
        self._maps: dict[int, mmap.mmap] = {}
        #: Descriptors received and not mapped yet (their GET was cancelled before it ran).
        self._queued: dict[int, tuple[int, int]] = {}
        self._populated: dict[int, set[tuple[int, int]]] = {}

    def drain(self) -> None:
        """Take every descriptor waiting on the channel: the daemon's sends fail once ten
        wait (the kernel's max_dgram_qlen), and a dropped region's must be closed."""
        while (got := self._receive_fd()) is not None:
            rid, size, fd = got
            stale = self._queued.pop(rid, None)
            if stale is not None:  # never sent twice by the daemon: keep the newer
                os.close(stale[1])
            self._queued[rid] = (size, fd)

    def view(self, rid: int, size: int, offset: int, length: int) -> memoryview:
        mapping = self._maps.get(rid)
        if mapping is None:
            self.drain()
            queued = self._queued.pop(rid, None)
            if queued is None:
                raise InternalError(
                    f"fetch worker: region {rid} was never sent before a GET into it; this "
                    "is a tensorferry bug: report it with the daemon's log"
                )
            got_size, fd = queued
            try:
                mapping = self._maps[rid] = mmap.mmap(fd, got_size)
            finally:
                os.close(fd)
        if len(mapping) != size or not 0 <= offset <= size - length:
            raise InternalError(
                f"fetch worker: region {rid}: bytes {offset}+{length} outside its "
                f"{len(mapping)}; this is a tensorferry bug: report it with the daemon's log"
            )
        self._populate(rid, mapping, offset, length)
        return memoryview(mapping)[offset : offset + length]

    def _populate(self, rid: int, mapping: mmap.mmap, offset: int, length: int) -> None:
        """Fill this mapping's page tables for the range's pages, once per range.

        The daemon's pages exist (or are being reserved for this range), but not this
        mapping's page tables: a fault per 4 KiB as the bytes arrive costs more than
        filling them in one call. Filling them again costs 0.09 CPU-s per GiB here (a walk
        over present pages) on every load into a recycled arena, where the same model's
        ranges come again: a range is filled once. Only its own pages: the rest of the
        arena may not be reserved yet (``sinks/populate.py``).
        """
        done = self._populated.setdefault(rid, set())
        if (offset, length) in done:
            return
        if len(done) >= _REMEMBERED:  # layouts of many models in turn: start over
            done.clear()
        first = offset - offset % _PAGE
        with contextlib.suppress(OSError, ValueError):  # MADV_POPULATE_WRITE: Linux 5.14
            mapping.madvise(_MADV_POPULATE_WRITE, first, offset + length - first)
        done.add((offset, length))

    def drop(self, rid: int) -> None:
        self.drain()
        queued = self._queued.pop(rid, None)
        if queued is not None:
            os.close(queued[1])
        mapping = self._maps.pop(rid, None)
        self._populated.pop(rid, None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # a finished GET's view not yet collected
                log.debug("region %d still exported; unmapped when collected", rid)

    def close(self) -> None:
        for rid in list(self._maps):
            self.drop(rid)
        for _, fd in self._queued.values():
            os.close(fd)
        self._queued.clear()
