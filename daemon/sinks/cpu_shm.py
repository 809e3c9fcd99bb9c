"""CPU arenas: one /dev/shm segment per model, shared with workers by name.

Segments are named ``tensorferry.<instance>.<token>`` (freed ones kept for reuse
``tensorferry.<instance>.free-<token>``), with 128 random bits in each token: /dev/shm is
world-writable, and any local user could create a name we are about to use. A taken name is
skipped for another, and no name is ever renamed onto (rename(2) would replace the file).

Each daemon instance holds an flock on ``tensorferry.<instance>.lock`` for its whole life;
the lock is taken before the file gets that name, so no other daemon ever finds it free. At
start a daemon removes the files of every instance whose lock is free or gone: its owner is
dead. PIDs are not used, as they repeat across containers and restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tensorferry.errors import FailedPrecondition, ResourceExhausted
from tensorferry.v1 import tensorferry_pb2 as pb

log = logging.getLogger(__name__)
PREFIX = "tensorferry."
FREE = "free-"
# With 128-bit names a taken one is another user's doing, never chance; give up after a few.
_NAME_ATTEMPTS = 8
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it


def _token() -> str:
    return secrets.token_hex(16)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not unlinked or replaced)."""
    try:
        return os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd))
    except FileNotFoundError:
        return False


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
        self._lock_fd: int | None = None

    @property
    def _lock_path(self) -> Path:
        return self.shm_dir / f"{PREFIX}{self.instance}.lock"

    async def __aenter__(self) -> CpuShmSink:
        self.sweep()
        self._lock_instance()
        return self

    def _lock_instance(self) -> None:
        """Lock a file under a name of its own, then link it into place, locked.

        Created and then locked at its final name, the lock would be free for a moment, and
        a daemon sweeping just then would take it for a dead one's and unlink it.
        """
        for _ in range(_NAME_ATTEMPTS):
            staging = self.shm_dir / f"{PREFIX}{self.instance}.locking-{_token()}"
            try:
                fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)  # fmt: skip
            except FileExistsError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.link(staging, self._lock_path)  # never replaces: EEXIST if taken
            except FileNotFoundError:
                # A sweep saw no lock for this instance yet and removed the staging name.
                os.close(fd)
                continue
            except FileExistsError:
                os.close(fd)
                self.instance = secrets.token_hex(6)
                continue
            except BaseException:
                os.close(fd)
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    staging.unlink()
            self._lock_fd = fd
            return
        raise self._names_taken()

    def _names_taken(self) -> FailedPrecondition:
        return FailedPrecondition(
            f"could not create a file in {self.shm_dir}: {_NAME_ATTEMPTS} random names in a "
            "row were taken; another user may be creating files there to block this daemon"
        )

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
        """Remove the files of dead instances (their lock is free or gone).

        Files are listed before any lock is tested: a daemon's lock is in place, held,
        before it creates a segment, so a file listed here whose lock is gone or free when
        tested afterwards belongs to a daemon that has ended (or is the staging name of a
        lock not yet placed, which its daemon then makes again).
        """
        files: dict[str, list[Path]] = {}
        for path in self.shm_dir.glob(f"{PREFIX}*.*"):
            instance = path.name[len(PREFIX) :].split(".", 1)[0]
            files.setdefault(instance, []).append(path)
        removed: list[str] = []
        for instance, paths in files.items():
            lock = self.shm_dir / f"{PREFIX}{instance}.lock"
            try:
                # Another user's symlink or fifo under that name must not be followed.
                fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None
            except OSError as exc:
                log.debug("not sweeping instance %s: %s", instance, exc)
                continue
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # alive
                    if not _same_file(fd, lock):
                        continue  # replaced since we opened it: that one is someone's
                for path in paths:
                    if path != lock:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            removed.append(path.name)
                # Only a lock we hold: one absent a moment ago may belong to a daemon now.
                if fd is not None:
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                        removed.append(lock.name)
            finally:
                if fd is not None:
                    os.close(fd)
        if removed:
            log.warning("removed %d stale shared-memory files of dead daemons", len(removed))
        return removed

    def _new_path(self, kind: str = "") -> Path:
        return self.shm_dir / f"{PREFIX}{self.instance}.{kind}{_token()}"

    def _create(self) -> tuple[int, Path]:
        """A new segment file under a fresh random name (another if one is taken)."""
        for _ in range(_NAME_ATTEMPTS):
            path = self._new_path()
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                return os.open(path, flags, self.mode), path
            except FileExistsError:
                log.warning("%s exists: another user created it; trying another name", path)
        raise self._names_taken()

    def _rename(self, path: Path, kind: str = "") -> Path:
        """``path`` under a fresh random name; link(2), unlike rename(2), replaces nothing."""
        for _ in range(_NAME_ATTEMPTS):
            new = self._new_path(kind)
            try:
                os.link(path, new)
            except FileExistsError:
                log.warning("%s exists: another user created it; trying another name", new)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return new
        raise self._names_taken()

    def available(self) -> int:
        avail = mem_available()
        if self.budget:
            avail = min(avail, self.budget - self.used)
        return max(avail, 0)

    def _take_recycled(self, size: int) -> tuple[Path, mmap.mmap] | None:
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
        self.recycled_bytes -= freed.capacity
        try:
            freed.path = self._rename(freed.path)
            if freed.capacity > size:
                freed.mapping.resize(size)  # truncates the segment too: the tail goes back
            elif freed.capacity < size:
                self._grow(freed, size)
        except (OSError, BufferError, FailedPrecondition) as exc:
            # Renamed away under us, or a failed fetch's traceback still holds a slice.
            log.debug("not reusing freed arena %s: %s", freed.path.name, exc)
            freed.drop()
            return None
        return freed.path, freed.mapping

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
        if self.budget and size > self.budget - self.used:
            self.reclaim(size - (self.budget - self.used))
            if size > self.budget - self.used:
                self._refuse(size, what, self.budget - self.used)
        path, mapping = self._take_recycled(size) or self._reserve(size, what)
        arena = ShmArena(path.name, size, path, mapping)
        self._arenas[path.name] = arena
        self.used += size
        return arena

    def _refuse(self, size: int, what: str, available: int) -> None:
        raise ResourceExhausted(
            f"loading {what} needs {size} bytes of shared memory but only {available} "
            f"are available (budget {self.budget or 'unset'}, in use {self.used}); "
            "evict a model with `tensorferry evict` or raise [memory] shm_budget"
        )

    def _reserve(self, size: int, what: str) -> tuple[Path, mmap.mmap]:
        """Map ``size`` bytes in a new file: freed memory first, else a new segment."""
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
        fd, path = self._create()
        try:
            os.fchmod(fd, self.mode)  # the umask must not narrow what workers may open
            os.fchown(fd, -1, self.group)
            # tmpfs never says ENOSPC on write: it OOM-kills. Reserve now to fail early.
            os.posix_fallocate(fd, 0, size)
            # The pages exist now: mapping them all in one call costs far less than a page
            # fault per 4 KiB as the bytes arrive.
            flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
            return path, mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
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
            try:
                free = self._rename(arena.path, FREE)
            except (OSError, FailedPrecondition) as exc:
                log.debug("not keeping arena %s for reuse: %s", arena.name, exc)
            else:
                self._free.append(_Freed(free, arena.size, mapping))
                self.recycled_bytes += arena.size
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
