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

from tensorferry.daemon.sinks import adopt_shm
from tensorferry.daemon.sinks.adopt_shm import Claimed, FdStore
from tensorferry.daemon.sinks.populate import Reservation, address_of
from tensorferry.daemon.sinks.sealed import SealedArena
from tensorferry.daemon.sinks.shm_arena import Freed, close_mapping
from tensorferry.daemon.sinks.shm_arena import ShmArena as ShmArena
from tensorferry.daemon.sinks.shm_arena import ShmUsage as ShmUsage
from tensorferry.daemon.sinks.shm_arena import mem_available as mem_available
from tensorferry.daemon.sinks.shm_names import FREE, ShmNames
from tensorferry.daemon.sinks.warm import WarmPool
from tensorferry.errors import FailedPrecondition, ResourceExhausted

log = logging.getLogger(__name__)


class CpuShmSink:
    """Creates, tracks and removes this daemon's segments."""

    def __init__(
        self, shm_dir: Path, *, mode: int = 0o640, budget: int = 0, group: int = -1,
        recycle_budget: int = 0, warm_bytes: int = 0, socket: str = "", adopt: bool = False,
        fd_store: FdStore | None = None,
    ) -> None:  # fmt: skip
        self.shm_dir = shm_dir
        #: Sealed arenas are adopted only by a daemon of the socket that sealed them.
        self.socket = socket
        self.adopt_arenas = adopt
        self.fd_store = fd_store
        #: A dead instance's sealed arenas, claimed at start: adopt() or discard() each.
        self.claimed: list[Claimed] = []
        self.adopted = 0
        #: Adopted arenas: a worker of the daemon before may map them, so never recycled.
        self._inherited: set[str] = set()
        self.mode = mode
        self.group = group
        self.recycle_budget = recycle_budget
        #: Set by the registry: evict unleased models (LRU) to free about this many bytes.
        self.reclaim: Callable[[int], None] = lambda needed: None
        self._free: list[Freed] = []
        #: The warm pool being populated (``warm.py``): counted as recycled already.
        self.warming: Freed | None = None
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
        # Locked first: what the sweep claims is linked under our instance, which must
        # already be alive to every other daemon's sweep.
        self.names.lock()
        try:
            self.claimed = adopt_shm.sweep(self.names, self.socket, self.adopt_arenas,
                                           self.fd_store)  # fmt: skip
        except BaseException:
            self.names.unlock()
            raise
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for arena in list(self._arenas.values()):
            self.release(arena, recycle=False)
        adopt_shm.close_claimed(self.claimed)  # sealed still: the next daemon may adopt them
        self._drop_recycled()
        self.names.unlock()

    def seal(self, arena: ShmArena, manifest: SealedArena) -> None:
        """Write the manifest of a ready arena (its last byte has landed)."""
        if arena.name in self._arenas and not arena.sealed:
            arena.sealed = adopt_shm.seal_arena(arena.path, manifest, self.fd_store)
            arena.manifest = manifest if arena.sealed else None

    def pin(self, arena: ShmArena) -> None:
        """A sealed arena's model was pinned: its manifest says so from now on."""
        if arena.sealed and arena.manifest is not None and not arena.manifest.pinned:
            arena.manifest = dataclasses.replace(arena.manifest, pinned=True)
            adopt_shm.reseal(arena.path, arena.manifest)

    def adopt(self, claimed: Claimed) -> ShmArena:
        """Map a claimed arena and hold it as if this daemon had loaded it."""
        mapping = adopt_shm.map_claimed(claimed, self.mode, self.group)
        arena = ShmArena(claimed.path.name, claimed.manifest.size, claimed.path, mapping)
        arena.sealed, arena.manifest = True, claimed.manifest
        self._arenas[arena.name] = arena
        self.used += arena.size
        self.adopted += 1
        self._inherited.add(arena.name)
        return arena

    def discard(self, claimed: Claimed, why: str) -> None:
        adopt_shm.discard_claimed(claimed, why, self.fd_store)

    def unseal(self, arena: ShmArena) -> None:
        """Its manifest goes (first, before the segment): an evicted model is not adopted."""
        if arena.sealed:
            adopt_shm.unseal(arena.path, self.fd_store)
            arena.sealed = False

    def leave(self, arena: ShmArena) -> None:
        """At exit: unmap a sealed arena but keep its file and manifest for the next daemon."""
        if not arena.sealed:
            self.release(arena, recycle=False)
        elif self._arenas.pop(arena.name, None) is not None:
            self.used -= arena.size
            if arena.reservation is not None:
                arena.reservation.close()
            if (mapping := arena.detach()) is not None:
                close_mapping(mapping, arena.name)

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

    def new_freed(self, size: int) -> Freed:
        """A segment for the recycle list, mapped, none of it reserved (the warm pool)."""
        path, mapping = self.new_segment(size, FREE)
        return Freed(path, size, mapping, 0)

    def keep(self, freed: Freed) -> None:
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
        if arena.name in self._inherited:
            self._inherited.discard(arena.name)
            recycle = False
        self.unseal(arena)
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
                self._free.append(Freed(free, arena.size, mapping, reserved))
                return
        if mapping is not None:
            close_mapping(mapping, arena.name)
        with contextlib.suppress(FileNotFoundError):
            arena.path.unlink()

    def usage(self) -> ShmUsage:
        # Without a budget the ceiling is what the host could still give, plus what we hold.
        ceiling = self.budget or mem_available() + self.used + self.recycled_bytes
        return ShmUsage(self.used, self.recycled_bytes, ceiling, self.arena_names)

    @property
    def arena_names(self) -> list[str]:
        return sorted(self._arenas)
