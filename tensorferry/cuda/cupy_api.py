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


def _uuid_of(props: dict[str, Any], ordinal: int) -> str:
    raw = props.get("uuid")
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        return f"GPU-{uuid.UUID(bytes=bytes(raw))}"
    if isinstance(raw, str) and raw:
        return f"GPU-{uuid.UUID(raw.removeprefix('GPU-'))}"
    # Older cupy builds do not expose the UUID; torch does (str(uuid) has no "GPU-").
    import torch

    return f"GPU-{torch.cuda.get_device_properties(ordinal).uuid}"


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
            self._infos = [
                DeviceInfo(
                    i,
                    _uuid_of(self._rt.getDeviceProperties(i), i),
                    normalize_pci(str(self._rt.deviceGetPCIBusId(i))),
                )
                for i in range(count)
            ]

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

    def _device(self, ordinal: int) -> Any:
        return self._cp.cuda.Device(ordinal)

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def current_device(self) -> int:
        # The runtime's current device: what torch.cuda.set_device chose, too.
        with self._translated():
            return int(self._rt.getDevice())

    def malloc(self, ordinal: int, nbytes: int) -> DeviceMemory:
        with self._translated(), self._device(ordinal):
            ptr = int(self._rt.malloc(nbytes))
        self._allocs[ptr] = ordinal
        return DeviceMemory(ordinal, ptr, nbytes)

    def free(self, mem: DeviceMemory) -> None:
        if self._allocs.get(mem.ptr) != mem.ordinal:
            raise CudaError("cudaErrorInvalidValue: not an allocation of this process")
        with self._translated(), self._device(mem.ordinal):
            self._rt.free(mem.ptr)  # raises CUDARuntimeError when cudaFree fails
        # Forgotten only once freed: after a failure the memory is still allocated.
        del self._allocs[mem.ptr]

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        with self._translated(), self._device(ordinal):
            free, total = self._rt.memGetInfo()
        return int(free), int(total)

    def ipc_get_handle(self, mem: DeviceMemory) -> bytes:
        with self._translated(), self._device(mem.ordinal):
            return bytes(self._rt.ipcGetMemHandle(mem.ptr))

    def ipc_open(self, handle: bytes, ordinal: int) -> int:
        with self._translated(), self._device(ordinal):
            return int(self._rt.ipcOpenMemHandle(handle))

    def ipc_close(self, ptr: int, ordinal: int) -> None:
        with self._translated(), self._device(ordinal):
            self._rt.ipcCloseMemHandle(ptr)

    def pointer_device(self, ptr: int) -> int:
        with self._translated():
            return int(self._rt.pointerGetAttributes(ptr).device)

    def host_register(self, ptr: int, nbytes: int) -> None:
        with self._translated():
            self._rt.hostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE)

    def host_unregister(self, ptr: int) -> None:
        with self._translated():
            self._rt.hostUnregister(ptr)

    def stream_create(self, ordinal: int) -> Stream:
        with self._translated(), self._device(ordinal):
            return Stream(ordinal, self._cp.cuda.Stream(non_blocking=True))

    def event_create(self, ordinal: int) -> Event:
        # block=True: cudaEventBlockingSync, so a waiting thread sleeps instead of spinning.
        with self._translated(), self._device(ordinal):
            return Event(ordinal, self._cp.cuda.Event(block=True, disable_timing=True))

    def memcpy_h2d_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        with self._translated(), self._device(stream.ordinal):
            self._rt.memcpyAsync(dst, src, nbytes, self._rt.memcpyHostToDevice, stream.native.ptr)

    def event_record(self, event: Event, stream: Stream) -> None:
        with self._translated(), self._device(stream.ordinal):
            event.native.record(stream.native)

    def event_query(self, event: Event) -> bool:
        # runtime.eventQuery, not Event.done: "not ready" is the one status that is no
        # error; any other raises (a sticky error must not read as "still running").
        with self._translated():
            status = int(self._rt.eventQuery(event.native.ptr))
        if status == _SUCCESS:
            return True
        if status == _NOT_READY:
            return False
        raise CudaError(f"cudaEventQuery failed with status {status}")

    def event_synchronize(self, event: Event) -> None:
        with self._translated():
            event.native.synchronize()

    def stream_synchronize(self, stream: Stream) -> None:
        with self._translated():
            stream.native.synchronize()

    def device_synchronize(self, ordinal: int) -> None:
        with self._translated():
            self._device(ordinal).synchronize()

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
