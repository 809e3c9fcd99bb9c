"""CPU arenas: one /dev/shm segment per model, shared with workers by name.

Segments are named ``tensorferry.<instance>.<n>`` and each daemon instance holds an
flock on ``tensorferry.<instance>.lock`` for its whole life. At start a daemon removes the
segments of every instance whose lock is free: its owner is dead. PIDs are not used, as
they repeat across containers and restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import logging
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tensorferry.errors import ResourceExhausted

log = logging.getLogger(__name__)
PREFIX = "tensorferry."
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclasses.dataclass(eq=False)
class ShmArena:
    name: str
    size: int
    path: Path
    _map: mmap.mmap | None

    @property
    def view(self) -> memoryview:
        assert self._map is not None, "arena already unmapped"
        return memoryview(self._map)

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

    def drop(self) -> None:
        _close(self.mapping, self.path.name)
        self.path.unlink(missing_ok=True)


class CpuShmSink:
    """Creates, tracks and removes this daemon's segments."""

    def __init__(
        self, shm_dir: Path, *, mode: int = 0o640, budget: int = 0, group: int = -1,
        recycle_budget: int = 0,
    ) -> None:  # fmt: skip
        self.shm_dir = shm_dir
        self.mode = mode
        self.group = group
        self.recycle_budget = recycle_budget
        #: Set by the registry: evict unleased models (LRU) to free about this many bytes.
        self.reclaim: Callable[[int], None] = lambda needed: None
        self.recycled_bytes = 0
        self._free: list[_Freed] = []
        self.budget = budget
        self.instance = secrets.token_hex(6)
        self.used = 0
        self._arenas: dict[str, ShmArena] = {}
        self._seq = itertools.count(1)
        self._lock_fd: int | None = None
        self._lock_path = shm_dir / f"{PREFIX}{self.instance}.lock"

    async def __aenter__(self) -> CpuShmSink:
        self.sweep()
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for arena in list(self._arenas.values()):
            self.release(arena, recycle=False)
        self._drop_recycled()
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def sweep(self) -> list[str]:
        """Remove segments of dead instances (their lock is free or gone)."""
        live: set[str] = set()
        removed: list[str] = []
        for lock in self.shm_dir.glob(f"{PREFIX}*.lock"):
            instance = lock.name[len(PREFIX) : -len(".lock")]
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.add(instance)
                continue
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
                removed.append(lock.name)
        for seg in self.shm_dir.glob(f"{PREFIX}*.*"):
            instance = seg.name[len(PREFIX) :].split(".", 1)[0]
            if instance not in live and not seg.name.endswith(".lock"):
                with contextlib.suppress(FileNotFoundError):
                    seg.unlink()
                    removed.append(seg.name)
        if removed:
            log.warning("removed %d stale shared-memory files of dead daemons", len(removed))
        return removed

    def available(self) -> int:
        avail = mem_available()
        if self.budget:
            avail = min(avail, self.budget - self.used)
        return max(avail, 0)

    def _take_recycled(self, size: int, name: str) -> mmap.mmap | None:
        """The still-mapped pages of a freed segment, renamed to ``name``, if one fits.

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
        self.recycled_bytes -= freed.capacity
        target = self.shm_dir / name
        try:
            os.rename(freed.path, target)
            freed.path = target
            if freed.capacity > size:
                freed.mapping.resize(size)  # truncates the segment too: the tail goes back
            elif freed.capacity < size:
                self._grow(freed, size)
        except (OSError, BufferError) as exc:
            # Renamed away under us, or a failed fetch's traceback still holds a slice.
            log.debug("not reusing freed arena %s: %s", freed.path.name, exc)
            freed.drop()
            return None
        return freed.mapping

    @staticmethod
    def _grow(freed: _Freed, size: int) -> None:
        fd = os.open(freed.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # tmpfs never says ENOSPC on write: it OOM-kills. Reserve now to fail early.
            os.posix_fallocate(fd, freed.capacity, size - freed.capacity)
        finally:
            os.close(fd)
        freed.mapping.resize(size)  # mremap: the old pages keep their page tables
        with contextlib.suppress(OSError):  # MADV_POPULATE_WRITE needs Linux 5.14
            freed.mapping.madvise(_MADV_POPULATE_WRITE, freed.capacity, size - freed.capacity)

    def _drop_recycled(self) -> None:
        for freed in self._free:
            freed.drop()
        self._free.clear()
        self.recycled_bytes = 0

    def allocate(self, size: int, what: str) -> ShmArena:
        name = f"{PREFIX}{self.instance}.{next(self._seq)}"
        if self.budget and size > self.budget - self.used:
            self.reclaim(size - (self.budget - self.used))
            if size > self.budget - self.used:
                self._refuse(size, what, self.budget - self.used)
        path = self.shm_dir / name
        mapping = self._take_recycled(size, name)
        if mapping is None:
            mapping = self._reserve(size, what, path)
        arena = ShmArena(name, size, path, mapping)
        self._arenas[name] = arena
        self.used += size
        return arena

    def _refuse(self, size: int, what: str, available: int) -> None:
        raise ResourceExhausted(
            f"loading {what} needs {size} bytes of shared memory but only {available} "
            f"are available (budget {self.budget or 'unset'}, in use {self.used}); "
            "evict a model with `tensorferry evict` or raise [memory] shm_budget"
        )

    def _reserve(self, size: int, what: str, path: Path) -> mmap.mmap:
        """Map ``size`` bytes at ``path``: freed memory first, else a new segment."""
        available = self.available()
        if size > available and self._free:
            self._drop_recycled()  # memory held for reuse yields to a real need
            available = self.available()
        if size > available:
            self.reclaim(size - available)  # evicted arenas land in the recycle pool...
            mapping = self._take_recycled(size, path.name)
            if mapping is not None:
                return mapping
            self._drop_recycled()  # ...or give their memory back
            available = self.available()
        if size > available:
            self._refuse(size, what, available)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        try:
            os.fchmod(fd, self.mode)  # the umask must not narrow what workers may open
            os.fchown(fd, -1, self.group)
            # tmpfs never says ENOSPC on write: it OOM-kills. Reserve now to fail early.
            os.posix_fallocate(fd, 0, size)
            # The pages exist now: mapping them all in one call costs far less than a page
            # fault per 4 KiB as the bytes arrive.
            flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
            return mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            path.unlink()
            raise
        finally:
            os.close(fd)

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
        if recycle and mapping is not None and arena.size <= self.recycle_budget:
            while self._free and self.recycled_bytes + arena.size > self.recycle_budget:
                oldest = self._free.pop(0)
                oldest.drop()
                self.recycled_bytes -= oldest.capacity
            free = self.shm_dir / f"{PREFIX}{self.instance}.free{next(self._seq)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(arena.path, free)
                self._free.append(_Freed(free, arena.size, mapping))
                self.recycled_bytes += arena.size
                return
        if mapping is not None:
            _close(mapping, arena.name)
        with contextlib.suppress(FileNotFoundError):
            arena.path.unlink()

    @property
    def arena_names(self) -> list[str]:
        return sorted(self._arenas)
