"""GPU identity and context state from the CUDA driver API and NVML, through ctypes.

Never through torch (the daemon must not import it, and a CPU-only torch knows no GPU) nor
through cupy's ``getDeviceProperties``, which turns the 16-byte UUID into bytes as a C
string and so cuts it at the first zero byte. ``cuDeviceGetUuid_v2`` respects
CUDA_VISIBLE_DEVICES (its ordinals are the process's own); NVML numbers every GPU of the
host, so it is asked by PCI bus id. Neither call creates a CUDA context.
"""

from __future__ import annotations

import ctypes
import functools
import os
import uuid
from pathlib import Path
from typing import Any

from tensorferry.cuda.api import CudaError

_SUCCESS = 0
#: Where the driver lists the GPUs it has bound (one directory per GPU).
PROC_GPUS = Path("/proc/driver/nvidia/gpus")


def format_uuid(raw: bytes) -> str:
    """``GPU-<uuid>`` from all 16 bytes, zero bytes included."""
    if len(raw) != 16:
        raise CudaError(f"a GPU UUID has 16 bytes, got {len(raw)}")
    return f"GPU-{uuid.UUID(bytes=bytes(raw))}"


@functools.cache
def _load(name: str) -> Any:
    """The library, or None where it is absent (no driver: a CPU host)."""
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def libcuda() -> Any:
    return _load("libcuda.so.1")


def libnvml() -> Any:
    return _load("libnvidia-ml.so.1")


def _check(status: int, call: str) -> None:
    if status != _SUCCESS:
        raise CudaError(f"{call} failed with status {status}")


def driver_uuid(ordinal: int, lib: Any = None) -> str:
    """The UUID of this process's ``cuda:<ordinal>`` from the driver API."""
    lib = lib if lib is not None else libcuda()
    if lib is None:
        raise CudaError("libcuda.so.1 is not loadable: no NVIDIA driver in this process")
    _check(lib.cuInit(0), "cuInit")
    device = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(device), ordinal), f"cuDeviceGet({ordinal})")
    raw = (ctypes.c_ubyte * 16)()
    getter = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    _check(getter(ctypes.byref(raw), device), "cuDeviceGetUuid_v2")
    return format_uuid(bytes(raw))


def nvml_uuid(pci_bus_id: str, lib: Any = None) -> str:
    """The UUID of the GPU at ``pci_bus_id`` from NVML (its own text form)."""
    lib = lib if lib is not None else libnvml()
    if lib is None:
        raise CudaError("libnvidia-ml.so.1 is not loadable: no NVIDIA driver here")
    _check(lib.nvmlInit_v2(), "nvmlInit_v2")
    try:
        handle = ctypes.c_void_p()
        _check(
            lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(handle)),
            f"nvmlDeviceGetHandleByPciBusId_v2({pci_bus_id})",
        )
        text = ctypes.create_string_buffer(96)
        _check(lib.nvmlDeviceGetUUID(handle, text, len(text)), "nvmlDeviceGetUUID")
        return "GPU-" + str(uuid.UUID(text.value.decode().removeprefix("GPU-")))
    finally:
        lib.nvmlShutdown()


def gpu_uuid(ordinal: int, pci_bus_id: str) -> str:
    """The driver API's answer, else NVML's; raises CudaError when neither can tell."""
    try:
        return driver_uuid(ordinal)
    except (CudaError, AttributeError) as first:
        try:
            return nvml_uuid(pci_bus_id)
        except (CudaError, AttributeError) as second:
            raise CudaError(f"no UUID for cuda:{ordinal}: {first}; NVML: {second}") from second


def primary_context_active(ordinal: int, lib: Any = None) -> bool | None:
    """Whether this process holds a CUDA context on the device (None: cannot tell)."""
    lib = lib if lib is not None else libcuda()
    if lib is None:
        return None
    try:
        if lib.cuInit(0) != _SUCCESS:
            return None
        device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(device), ordinal) != _SUCCESS:
            return None
        state = lib.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active))
    except AttributeError:
        return None
    return bool(active.value) if state == _SUCCESS else None


def driver_gpus() -> int:
    """GPUs the NVIDIA driver has bound on this host, whatever this process can use:
    what says a daemon without usable CUDA is on a GPU host. Read from /proc, then NVML."""
    try:
        return len(os.listdir(PROC_GPUS))
    except OSError:
        pass
    lib = libnvml()
    if lib is None:
        return 0
    count = ctypes.c_uint()
    try:
        if lib.nvmlInit_v2() != _SUCCESS:
            return 0
        try:
            return count.value if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
        finally:
            lib.nvmlShutdown()
    except AttributeError:
        return 0


class ThreadContext:
    """The calling thread's current CUDA context, read and set through the driver API.

    What ``CupyCudaApi`` saves before it switches a thread to a device and puts back after:
    cupy's ``Device.__exit__`` would call ``cudaSetDevice(previous)`` instead, and since
    CUDA 12 that creates the previous device's primary context (device 0 on a thread that
    had none): memory on a GPU the daemon never loaded onto, and a failure on a GPU an
    engine holds in EXCLUSIVE_PROCESS mode, after the call it wrapped had run.
    """

    def __init__(self, lib: Any = None) -> None:
        self._lib = lib if lib is not None else libcuda()
        if self._lib is None:
            raise CudaError("libcuda.so.1 is not loadable: no NVIDIA driver in this process")
        _check(self._lib.cuInit(0), "cuInit")

    def current(self) -> int | None:
        """The thread's context handle; None when it has none."""
        ctx = ctypes.c_void_p()
        _check(self._lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        return ctx.value or None

    def set_current(self, ctx: int | None) -> None:
        """Bind ``ctx`` to the thread (None: unbind, so the thread holds no context)."""
        _check(self._lib.cuCtxSetCurrent(ctypes.c_void_p(ctx)), "cuCtxSetCurrent")
