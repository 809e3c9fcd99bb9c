"""``CudaApi`` on cupy (``pip install 'tensorferry[cuda]'``), imported only when used.

Written from cupy's documented runtime API (``cupy.cuda.runtime``) without a GPU at
hand; docs/cuda.md lists what still needs checking on hardware. Arenas are raw
``runtime.malloc`` allocations (one cudaMalloc each, never cupy's pool, whose blocks
share a segment and so an IPC handle), freed with ``runtime.free``: unlike dropping a
``cupy.cuda.Memory``, whose destructor cannot raise, it reports a failed cudaFree.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tensorferry.cuda import driver
from tensorferry.cuda.api import (
    CudaApi,
    CudaError,
    DeviceInfo,
    DeviceMemory,
    Event,
    Stream,
    normalize_pci,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
#: cudaHostRegisterPortable: pinned for every context, so one ring feeds every GPU.
_HOST_REGISTER_PORTABLE = 1
#: cudaSuccess and cudaErrorNotReady, as ``runtime.eventQuery`` returns them (any other
#: status raises CUDARuntimeError).
_SUCCESS = 0
_NOT_READY = 600
#: cudaStreamNonBlocking: no implicit sync with the legacy default stream.
_STREAM_NON_BLOCKING = 1
#: cudaEventBlockingSync | cudaEventDisableTiming.
_EVENT_FLAGS = 1 | 2


def _uuid_of(props: dict[str, Any], ordinal: int, pci_bus_id: str = "") -> str:
    raw = props.get("uuid")
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        return driver.format_uuid(bytes(raw))
    if isinstance(raw, str) and raw:
        return f"GPU-{uuid.UUID(raw.removeprefix('GPU-'))}"
    # Absent (older cupy), or cut short at a zero byte (cupy reads the char[16] as a C
    # string): ask the driver API, then NVML. Never torch: the daemon does not import it.
    return driver.gpu_uuid(ordinal, pci_bus_id)


class CupyCudaApi(CudaApi):
    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self._cp: Any = cupy
        self._rt: Any = cupy.cuda.runtime
        self._errors: tuple[type[BaseException], ...] = tuple(
            e
            for e in (
                getattr(self._rt, "CUDARuntimeError", None),
                getattr(cupy.cuda.memory, "OutOfMemoryError", None),
            )
            if isinstance(e, type)
        )
        #: Live arenas: base pointer -> ordinal.
        self._allocs: dict[int, int] = {}
        with self._translated():
            count = int(self._rt.getDeviceCount())
            # Neither call creates a context: a daemon that never loads onto a GPU holds
            # no memory there.
            pcis = [normalize_pci(str(self._rt.deviceGetPCIBusId(i))) for i in range(count)]
            self._infos = [
                DeviceInfo(i, _uuid_of(self._rt.getDeviceProperties(i), i, pcis[i]), pcis[i])
                for i in range(count)
            ]
        self._ctx = driver.ThreadContext()

    @classmethod
    def create_or_none(cls) -> CupyCudaApi | None:
        """The real API, or None when cupy is missing or no device is visible."""
        try:
            api = cls()
        except Exception as exc:
            # Broad on purpose: a missing driver or a cupy built for another CUDA raises
            # its own types; any of them means "no usable CUDA here", which callers handle.
            log.info("no usable CUDA through cupy: %s: %s", type(exc).__name__, exc)
            return None
        return api if api._infos else None

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            name = type(exc).__name__
            message = str(exc)
            if name == "OutOfMemoryError" and "cudaErrorMemoryAllocation" not in message:
                message = f"cudaErrorMemoryAllocation: {message}"
            raise CudaError(message) from exc

    @contextlib.contextmanager
    def _on(self, ordinal: int) -> Iterator[None]:
        """Run a call in ``ordinal``'s context, then give the thread back the context it
        had (none, on the loop's and the executor's threads). Never cupy's ``Device``: its
        exit calls cudaSetDevice(previous), which creates a context on a device never
        loaded onto (device 0) and can fail there after the wrapped call ran."""
        saved = self._ctx.current()
        try:
            self._rt.setDevice(ordinal)
            yield
        finally:
            try:
                self._ctx.set_current(saved)
            except CudaError as exc:
                # Not raised: the wrapped call's effect (an allocation, a queued copy) has
                # happened and its caller must learn of it. The thread stays in a context
                # of a device this process opened, which costs nothing more.
                log.error("restoring the thread's CUDA context after a call on cuda:%d "
                          "failed: %s", ordinal, exc)  # fmt: skip

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def current_device(self) -> int:
        # The runtime's current device: what torch.cuda.set_device chose, too.
        with self._translated():
            return int(self._rt.getDevice())

    def bind_thread(self, ordinal: int) -> None:
        with self._translated():
            self._rt.setDevice(ordinal)

    def malloc(self, ordinal: int, nbytes: int) -> DeviceMemory:
        with self._translated(), self._on(ordinal):
            ptr = int(self._rt.malloc(nbytes))
            # Recorded at once: whatever happens next, the allocation is known to free.
            self._allocs[ptr] = ordinal
        return DeviceMemory(ordinal, ptr, nbytes)

    def free(self, mem: DeviceMemory) -> None:
        if self._allocs.get(mem.ptr) != mem.ordinal:
            raise CudaError("cudaErrorInvalidValue: not an allocation of this process")
        with self._translated(), self._on(mem.ordinal):
            self._rt.free(mem.ptr)  # raises CUDARuntimeError when cudaFree fails
            # Forgotten only once freed: after a failure the memory is still allocated.
            del self._allocs[mem.ptr]

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        with self._translated(), self._on(ordinal):
            free, total = self._rt.memGetInfo()
        return int(free), int(total)

    def ipc_get_handle(self, mem: DeviceMemory) -> bytes:
        with self._translated(), self._on(mem.ordinal):
            return bytes(self._rt.ipcGetMemHandle(mem.ptr))

    def ipc_open(self, handle: bytes, ordinal: int) -> int:
        with self._translated(), self._on(ordinal):
            return int(self._rt.ipcOpenMemHandle(handle))

    def ipc_close(self, ptr: int, ordinal: int) -> None:
        with self._translated(), self._on(ordinal):
            self._rt.ipcCloseMemHandle(ptr)

    def pointer_device(self, ptr: int) -> int:
        with self._translated():
            return int(self._rt.pointerGetAttributes(ptr).device)

    def host_register(self, ptr: int, nbytes: int, ordinal: int | None = None) -> None:
        # In the given device's context: the runtime would otherwise create one on device 0.
        with self._translated(), self._on(0 if ordinal is None else ordinal):
            self._rt.hostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE)

    def context_active(self, ordinal: int) -> bool | None:
        return driver.primary_context_active(ordinal)

    def host_unregister(self, ptr: int, ordinal: int | None = None) -> None:
        with self._translated(), self._on(0 if ordinal is None else ordinal):
            self._rt.hostUnregister(ptr)

    # Streams and events are the runtime's raw handles, destroyed explicitly in their
    # device's context: cupy's objects destroy theirs in a destructor, on whatever thread
    # drops the last reference, where the runtime would create a context on device 0.

    def stream_create(self, ordinal: int) -> Stream:
        with self._translated(), self._on(ordinal):
            return Stream(ordinal, int(self._rt.streamCreateWithFlags(_STREAM_NON_BLOCKING)))

    def stream_destroy(self, stream: Stream) -> None:
        with self._translated(), self._on(stream.ordinal):
            self._rt.streamDestroy(stream.native)

    def event_create(self, ordinal: int) -> Event:
        # Blocking sync: a waiting thread sleeps instead of spinning.
        with self._translated(), self._on(ordinal):
            return Event(ordinal, int(self._rt.eventCreateWithFlags(_EVENT_FLAGS)))

    def event_destroy(self, event: Event) -> None:
        with self._translated(), self._on(event.ordinal):
            self._rt.eventDestroy(event.native)

    def memcpy_h2d_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        with self._translated(), self._on(stream.ordinal):
            self._rt.memcpyAsync(dst, src, nbytes, self._rt.memcpyHostToDevice, stream.native)

    def event_record(self, event: Event, stream: Stream) -> None:
        with self._translated(), self._on(stream.ordinal):
            self._rt.eventRecord(event.native, stream.native)

    def event_query(self, event: Event) -> bool:
        # runtime.eventQuery, not cupy's Event.done: "not ready" is the one status that is
        # no error; any other raises (a sticky error must not read as "still running").
        with self._translated(), self._on(event.ordinal):
            status = int(self._rt.eventQuery(event.native))
        if status == _SUCCESS:
            return True
        if status == _NOT_READY:
            return False
        raise CudaError(f"cudaEventQuery failed with status {status}")

    def event_synchronize(self, event: Event) -> None:
        with self._translated(), self._on(event.ordinal):
            self._rt.eventSynchronize(event.native)

    def stream_synchronize(self, stream: Stream) -> None:
        with self._translated(), self._on(stream.ordinal):
            self._rt.streamSynchronize(stream.native)

    def device_synchronize(self, ordinal: int) -> None:
        with self._translated(), self._on(ordinal):
            self._rt.deviceSynchronize()

    def as_tensor(self, owner: object, ptr: int, nbytes: int, ordinal: int) -> torch.Tensor:
        import torch

        # uint8 always: bf16 and fp8 have no __cuda_array_interface__ typestr; callers view
        # the bytes as their dtype. Writable, as torch refuses read-only interfaces. No
        # "stream" key: the daemon synchronised before it announced the arena.
        owner.__cuda_array_interface__ = {  # type: ignore[attr-defined]
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None,
            "version": 3,
        }  # fmt: skip
        with torch.cuda.device(ordinal):
            flat = torch.as_tensor(owner, device=f"cuda:{ordinal}")
        if flat.data_ptr() != ptr:
            raise CudaError("torch copied the imported arena instead of viewing it")
        return flat
