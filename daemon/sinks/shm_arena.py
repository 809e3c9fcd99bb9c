"""A CPU arena and a freed one kept for reuse: the objects ``CpuShmSink`` hands out and keeps."""

from __future__ import annotations

import dataclasses
import logging
import mmap
from pathlib import Path
from typing import Any

from tensorferry.daemon.sinks.populate import Reservation
from tensorferry.daemon.sinks.sealed import SealedArena
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
    #: A manifest is beside it (``sealed.py``): the next daemon may adopt it.
    sealed: bool = False
    #: What that manifest says (rewritten when the model is pinned).
    manifest: SealedArena | None = None

    @property
    def view(self) -> memoryview:
        assert self._map is not None, "arena already unmapped"
        return memoryview(self._map)

    def grant(self) -> dict[str, Any]:
        return {"cpu_shm": pb.CpuShmGrant(name=self.name, size=self.size)}

    def detach(self) -> mmap.mmap | None:
        mapping, self._map = self._map, None
        return mapping


def close_mapping(mapping: mmap.mmap, name: str) -> None:
    try:
        mapping.close()
    except BufferError:
        # A failed fetch's traceback may still hold a slice; GC unmaps it later.
        log.debug("arena %s still exported; left to the garbage collector", name)


@dataclasses.dataclass(eq=False)
class Freed:
    """A released arena kept for the next load: its pages and page tables stay."""

    path: Path
    capacity: int
    mapping: mmap.mmap
    #: ``[0, reserved)`` is allocated and mapped; the rest is reserved when it is reused.
    reserved: int

    def drop(self) -> None:
        close_mapping(self.mapping, self.path.name)
        self.path.unlink(missing_ok=True)
