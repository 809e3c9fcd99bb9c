"""CPU arenas: one /dev/shm segment per model, shared with workers by name.

Segments are created, named and swept through ``shm_names.ShmNames``; this module sizes,
maps, recycles and releases them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tensorferry.daemon.sinks.populate import Reservation, address_of
from tensorferry.daemon.sinks.shm_names import FREE, ShmNames
from tensorferry.daemon.sinks.warm import WarmPool
from tensorferry.errors import FailedPrecondition, ResourceExhausted
from tensorferry.v1 import tensorferry_pb2 as pb

log = logging.getLogger(__name__)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class ShmUsage:
    resident: int
    recycled: int  # freed arenas kept mapped for reuse
    budget: int  # [memory] shm_budget, or MemAvailable plus what the daemon holds
    arenas: list[str]


@dataclasses.dataclass(eq=False)
class ShmArena:
    name: str
    size: int
    path: Path
    _map: mmap.mmap | None
    #: The memory still to allocate and map, alongside the fetch (``cpu_load``); None
    #: when it was all there already (a recycled arena).
    reservation: Reservation | None = None

    @property
    def view(self) -> memoryview:
        assert self._map is not None, "arena already unmapped"
        return memoryview(self._map)

    def grant(self) -> dict[str, Any]:
        return {"cpu_shm": pb.CpuShmGrant(name=self.name, size=self.size)}

    def detach(self) -> mmap.mmap | None:
        mapping, self._map = self._map, None
        return mapping


def _close(mapping: mmap.mmap, name: str) -> None:
    try:
        mapping.close()
    except BufferError:
        # A failed fetch's traceback may still hold a slice; GC unmaps it later.
        log.debug("arena %s still exported; left to the garbage collector", name)


@dataclasses.dataclass(eq=False)
class _Freed:
    """A released arena kept for the next load: its pages and page tables stay."""

    path: Path
    capacity: int
    mapping: mmap.mmap
    #: ``[0, reserved)`` is allocated and mapped; the rest is reserved when it is reused.
    reserved: int

    def drop(self) -> None:
        _close(self.mapping, self.path.name)
        self.path.unlink(missing_ok=True)


class CpuShmSink:
    """Creates, tracks and removes this daemon's segments."""

    def __init__(
        self, shm_dir: Path, *, mode: int = 0o640, budget: int = 0, group: int = -1,
        recycle_budget: int = 0, warm_bytes: int = 0,
    ) -> None:  # fmt: skip
        self.shm_dir = shm_dir
        self.mode = mode
        self.group = group
        self.recycle_budget = recycle_budget
        #: Set by the registry: evict unleased models (LRU) to free about this many bytes.
        self.reclaim: Callable[[int], None] = lambda needed: None
        self._free: list[_Freed] = []
        #: The warm pool being populated (``warm.py``): counted as recycled already.
        self.warming: _Freed | None = None
        #: ``[limits] warm_bytes`` populated after READY (the server runs ``pool.fill``).
        self.pool = WarmPool(self, warm_bytes)
        self.budget = budget
        self.names = ShmNames(shm_dir, mode)
        self.used = 0
        self._arenas: dict[str, ShmArena] = {}

    @property
    def recycled_bytes(self) -> int:
        warming = self.warming.capacity if self.warming is not None else 0
        return sum(f.capacity for f in self._free) + warming

    @property
    def instance(self) -> str:
        return self.names.instance

    async def __aenter__(self) -> CpuShmSink:
        self.names.sweep()
        self.names.lock()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for arena in list(self._arenas.values()):
            self.release(arena, recycle=False)
        self._drop_recycled()
        self.names.unlock()

    def sweep(self) -> list[str]:
        """Remove the files of dead daemon instances (see ``ShmNames.sweep``)."""
        return self.names.sweep()

    def available(self) -> int:
        avail = mem_available()
        if self.budget:
            avail = min(avail, self.budget - self.used)
        return max(avail, 0)

    def _take_recycled(self, size: int) -> tuple[Path, mmap.mmap, int] | None:
        """The still-mapped pages of a freed segment, under a new name, if one fits.

        The kernel zeroes every fresh tmpfs page on first write, which costs more CPU than
        receiving the bytes; a freed arena's pages are already there, and so are its page
        table entries: populating 2 GiB of them again takes 0.14 s here.
        """
        fits = [f for f in self._free if size <= f.capacity <= 2 * size + (64 << 20)]
        # A smaller one grows: only the difference is fresh memory (models of similar size
        # taking turns).
        grows = [f for f in self._free if size // 2 <= f.capacity < size]
        if fits:
            freed = min(fits, key=lambda f: f.capacity)
        elif grows and size - max(f.capacity for f in grows) <= self.available():
            freed = max(grows, key=lambda f: f.capacity)
        else:
            return None
        self._free.remove(freed)
        try:
            freed.path = self.names.rename(freed.path)
            # Shrinking truncates the segment too: the tail goes back. Growing maps the
            # old pages with their page tables; the rest is reserved alongside the fetch.
            if freed.capacity != size:
                freed.mapping.resize(size)
        except (OSError, BufferError, FailedPrecondition) as exc:
            # Renamed away under us, or a failed fetch's traceback still holds a slice.
            log.debug("not reusing freed arena %s: %s", freed.path.name, exc)
            freed.drop()
            return None
        return freed.path, freed.mapping, min(freed.reserved, size)

    def new_freed(self, size: int) -> _Freed:
        """A segment for the recycle list, mapped, none of it reserved (the warm pool)."""
        path, mapping = self.new_segment(size, FREE)
        return _Freed(path, size, mapping, 0)

    def keep(self, freed: _Freed) -> None:
        self._free.append(freed)

    def _drop_recycled(self) -> None:
        for freed in self._free:
            freed.drop()
        self._free.clear()

    def allocate(self, size: int, what: str) -> ShmArena:
        if self.budget and size > self.budget - self.used:
            self.reclaim(size - (self.budget - self.used))
            if size > self.budget - self.used:
                self._refuse(size, what, self.budget - self.used)
        path, mapping, reserved = self._take_recycled(size) or self._reserve(size, what)
        arena = ShmArena(path.name, size, path, mapping)
        if reserved < size:
            arena.reservation = self.reservation(path, mapping, reserved, size, what)
        self._arenas[path.name] = arena
        self.used += size
        return arena

    def reservation(
        self, path: Path, mapping: mmap.mmap, start: int, size: int, what: str
    ) -> Reservation:
        """What reserves ``[start, size)`` of a mapped segment (see ``populate.py``)."""
        used = self.used

        def refuse(reserved: int) -> ResourceExhausted:
            # The host's tmpfs said no after ``reserved`` bytes: that was what it had.
            return self._refusal(size, what, reserved, used)

        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return Reservation(fd, address_of(mapping), start, size, refuse=refuse)

    def _refusal(self, size: int, what: str, available: int, used: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"loading {what} needs {size} bytes of shared memory but only {available} "
            f"are available (budget {self.budget or 'unset'}, in use {used}); "
            "evict a model with `tensorferry evict` or raise [memory] shm_budget"
        )

    def _refuse(self, size: int, what: str, available: int) -> None:
        raise self._refusal(size, what, available, self.used)

    def _reserve(self, size: int, what: str) -> tuple[Path, mmap.mmap, int]:
        """Map ``size`` bytes in a new file: freed memory first, else a new segment
        (its memory reserved later, alongside the fetch)."""
        available = self.available()
        if size > available and self._free:
            self._drop_recycled()  # memory held for reuse yields to a real need
            available = self.available()
        if size > available:
            self.reclaim(size - available)  # evicted arenas land in the recycle pool...
            recycled = self._take_recycled(size)
            if recycled is not None:
                return recycled
            self._drop_recycled()  # ...or give their memory back
            available = self.available()
        if size > available:
            self._refuse(size, what, available)
        return *self.new_segment(size), 0

    def new_segment(self, size: int, kind: str = "") -> tuple[Path, mmap.mmap]:
        """A segment of ``size`` bytes, mapped, none of them allocated yet: tmpfs never
        says ENOSPC on write, it SIGBUSes, so nothing may write a page before a
        ``Reservation`` has allocated it."""
        fd, path = self.names.create()
        try:
            os.fchmod(fd, self.mode)  # the umask must not narrow what workers may open
            os.fchown(fd, -1, self.group)
            if kind:
                path = self.names.rename(path, kind)
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            path.unlink()
            raise
        finally:
            os.close(fd)
        return path, mapping

    def release(self, arena: ShmArena, *, recycle: bool = True) -> None:
        """Keep the segment, still mapped, for reuse (renamed), or unmap and unlink it.

        Only recycle when no worker can still map it: a freed model's leases are all gone,
        and a lease ends when the worker's last view is gone. (An explicit Release while
        views live is the exception the caller signals with ``recycle=False``: unlinking
        keeps those views valid.)
        """
        if self._arenas.pop(arena.name, None) is None:
            return
        self.used -= arena.size
        mapping = arena.detach()
        reserved = arena.size
        if arena.reservation is not None:
            arena.reservation.close()  # its thread has ended: cpu_load waits for it
            reserved = arena.reservation.reserved
        if recycle and mapping is not None and arena.size <= self.recycle_budget:
            while self._free and self.recycled_bytes + arena.size > self.recycle_budget:
                self._free.pop(0).drop()
            try:
                free = self.names.rename(arena.path, FREE)
            except (OSError, FailedPrecondition) as exc:
                log.debug("not keeping arena %s for reuse: %s", arena.name, exc)
            else:
                self._free.append(_Freed(free, arena.size, mapping, reserved))
                return
        if mapping is not None:
            _close(mapping, arena.name)
        with contextlib.suppress(FileNotFoundError):
            arena.path.unlink()

    def usage(self) -> ShmUsage:
        # Without a budget the ceiling is what the host could still give, plus what we hold.
        ceiling = self.budget or mem_available() + self.used + self.recycled_bytes
        return ShmUsage(self.used, self.recycled_bytes, ceiling, self.arena_names)

    @property
    def arena_names(self) -> list[str]:
        return sorted(self._arenas)
