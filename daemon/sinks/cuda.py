"""GPU arenas: one raw allocation per (model, GPU), exported once as a CUDA IPC handle.

An arena is freed only when (1) the registry releases it (evicted, no lease left: every
worker has closed its mapping, since the client closes the handle before it ends the
lease) and (2) no queued H2D copy still writes into it. A load that fails or is cancelled
releases its arenas at once; the free then waits for the copies already queued, which
complete on their own (see ``CudaArena.copy_finished``).

cudaMalloc of a whole arena and cudaFree (which may wait for the device) never run on the
event loop: both go to one worker thread the sink owns. One thread, so they run in the
order asked for: a headroom check queued after the frees a reclaim started sees them done.
``close`` waits for every free still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from tensorferry.cuda import CudaApi, CudaError, DeviceInfo, DeviceMemory
from tensorferry.errors import InternalError, ResourceExhausted
from tensorferry.v1 import tensorferry_pb2 as pb

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclasses.dataclass(eq=False)
class CudaArena:
    name: str  # for logs and Status: "cuda.<instance>.<n>"
    device: DeviceInfo
    size: int
    memory: DeviceMemory
    handle: bytes
    #: H2D copies queued into the arena and not yet complete.
    inflight: int = 0
    #: The first CUDA error a copy into the arena reported.
    error: BaseException | None = None
    #: Released while copies were queued: freed when the last one completes.
    freeing: bool = False
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    _free: Callable[[CudaArena], None] | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def ptr(self) -> int:
        return self.memory.ptr

    @property
    def ordinal(self) -> int:
        return self.device.ordinal

    def grant(self) -> dict[str, Any]:
        ipc = pb.CudaIpcGrant(
            handle=self.handle, size=self.size, gpu_uuid=self.device.uuid,
            pci_bus_id=self.device.pci_bus_id,
        )  # fmt: skip
        return {"cuda_ipc": ipc}

    def copy_queued(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def copy_finished(self, error: BaseException | None) -> None:
        self.inflight -= 1
        if error is not None and self.error is None:
            self.error = error
        if self.inflight == 0:
            self.idle.set()
            if self.freeing and self._free is not None:
                self._free(self)


class CudaSink:
    """Allocates and frees this daemon's GPU arenas and keeps each GPU's reserve free."""

    def __init__(self, api: CudaApi, *, reserve: int, instance: str) -> None:
        self.api = api
        self.reserve = reserve
        self.instance = instance
        #: Set by the registry: evict unleased models on a GPU (by UUID), least recently
        #: used first, to free about this many bytes.
        self.reclaim: Callable[[int, str], None] = lambda needed, gpu_uuid: None
        self._arenas: dict[str, CudaArena] = {}
        self._seq = itertools.count(1)
        #: cudaMalloc and cudaFree, in the order asked for (see the module's docstring).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cuda-sink")

    @property
    def used(self) -> int:
        return sum(a.size for a in self._arenas.values())

    def used_on(self, ordinal: int) -> int:
        return sum(a.size for a in self._arenas.values() if a.ordinal == ordinal)

    @property
    def arena_names(self) -> list[str]:
        return sorted(self._arenas)

    def _headroom(self, device: DeviceInfo) -> int:
        free, _ = self.api.mem_get_info(device.ordinal)
        return free - self.reserve

    def _refuse(self, device: DeviceInfo, size: int, what: str, headroom: int) -> None:
        raise ResourceExhausted(
            f"loading {what} onto {device.uuid} needs {size} bytes of GPU memory but only "
            f"{max(headroom, 0)} are free beyond the reserve ({self.reserve} bytes, [cuda] "
            "reserve); evict a model with `tensorferry evict` or free memory on that GPU"
        )

    async def place(self, device: DeviceInfo, size: int, what: str) -> CudaArena:
        """A new arena of ``size`` bytes on ``device``: what a load calls. The CUDA calls
        run on the sink's thread; a reclaim runs here, on the loop (it evicts models)."""
        try:
            headroom = await self._run(self._headroom, device)
            if size > headroom:
                self.reclaim(size - headroom, device.uuid)
                # Queued behind the frees the reclaim started: it sees them done.
                headroom = await self._run(self._headroom, device)
            if size > headroom:
                self._refuse(device, size, what, headroom)
        except CudaError as exc:
            raise self._malloc_failed(device, size, what, exc) from exc
        memory, handle = await self._run(self._malloc_export, device, size, what, free=True)
        return self._adopt(device, size, what, memory, handle)

    def allocate(self, device: DeviceInfo, size: int, what: str) -> CudaArena:
        """``place`` without a thread, blocking the caller: for tools and tests, never
        the daemon's event loop."""
        try:
            headroom = self._headroom(device)
            if size > headroom:
                self.reclaim(size - headroom, device.uuid)
                # On the sink's thread, behind the frees the reclaim queued.
                headroom = self._thread.submit(self._headroom, device).result()
            if size > headroom:
                self._refuse(device, size, what, headroom)
        except CudaError as exc:
            raise self._malloc_failed(device, size, what, exc) from exc
        memory, handle = self._malloc_export(device, size, what)
        return self._adopt(device, size, what, memory, handle)

    def _malloc_failed(
        self, device: DeviceInfo, size: int, what: str, exc: CudaError
    ) -> BaseException:
        if exc.out_of_memory:
            try:
                self._refuse(device, size, what, 0)
            except ResourceExhausted as refused:
                return refused
        return InternalError(f"CUDA failed to allocate {size} bytes on {device.uuid}: {exc}")

    def _malloc_export(
        self, device: DeviceInfo, size: int, what: str
    ) -> tuple[DeviceMemory, bytes]:
        try:
            memory = self.api.malloc(device.ordinal, size)
        except CudaError as exc:
            raise self._malloc_failed(device, size, what, exc) from exc
        try:
            handle = self.api.ipc_get_handle(memory)
        except BaseException as exc:
            self.api.free(memory)
            if isinstance(exc, CudaError):
                raise InternalError(
                    f"CUDA failed to export an arena on {device.uuid}: {exc}"
                ) from exc
            raise
        return memory, handle

    def _adopt(
        self, device: DeviceInfo, size: int, what: str, memory: DeviceMemory, handle: bytes
    ) -> CudaArena:
        arena = CudaArena(f"cuda.{self.instance}.{next(self._seq)}", device, size, memory, handle)
        arena._free = self._free
        self._arenas[arena.name] = arena
        log.debug("arena %s: %d bytes on %s for %s", arena.name, size, device.uuid, what)
        return arena

    async def _run(self, fn: Callable[..., _T], *args: Any, free: bool = False) -> _T:
        """``fn(*args)`` on the sink's thread. ``free``: the result is an allocation
        (memory, handle) that a caller cancelled meanwhile no longer wants, so the thread
        frees it once it has it (the call cannot be interrupted)."""
        done = self._thread.submit(fn, *args)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            if free:
                done.add_done_callback(self._free_unwanted)
            raise

    def _free_unwanted(self, done: concurrent.futures.Future[Any]) -> None:
        # On the sink's thread (or here, if it had finished): queue the free behind it.
        if done.cancelled() or done.exception() is not None:
            return
        memory, _ = done.result()
        self._submit_free(memory, "an arena whose load was cancelled")

    def release(self, arena: CudaArena, *, recycle: bool = True) -> None:
        """Free the arena now, or once the copies queued into it are complete.

        GPU arenas are never kept for reuse (``recycle`` is for the interface): cudaMalloc
        of a whole arena is cheap next to its fill, unlike fresh tmpfs pages.
        """
        if arena.name not in self._arenas or arena.freeing:
            return
        arena.freeing = True
        if arena.inflight == 0:
            self._free(arena)

    def _free(self, arena: CudaArena) -> None:
        # On the loop (release, or a copy-completion callback): the bookkeeping here, the
        # cudaFree on the sink's thread.
        if self._arenas.pop(arena.name, None) is None:
            return
        self._submit_free(arena.memory, f"arena {arena.name} on {arena.device.uuid}")

    def _submit_free(self, memory: DeviceMemory, what: str) -> None:
        self._thread.submit(self._free_now, memory, what)

    def _free_now(self, memory: DeviceMemory, what: str) -> None:
        try:
            self.api.free(memory)
        except CudaError as exc:
            # Nothing to retry: a failed free means the context is broken (sticky error).
            log.error("freeing %s failed: %s", what, exc)

    def close(self) -> None:
        """Free every arena and wait for every queued free (daemon exit: copies are
        complete, workers' leases ended). Blocks: nothing else is left to run then."""
        for arena in list(self._arenas.values()):
            if arena.inflight:
                log.warning("arena %s freed with %d copies pending", arena.name, arena.inflight)
            self._free(arena)
        self._thread.shutdown(wait=True)
