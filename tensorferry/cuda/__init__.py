"""CUDA behind one narrow interface (``CudaApi``): cupy on GPU hosts, a fake in CI.

Nothing here imports cupy or torch at import time; the client imports this package only
when a worker asks for a ``cuda`` device.
"""

from __future__ import annotations

from tensorferry.cuda.api import (
    IPC_HANDLE_BYTES,
    CudaApi,
    CudaError,
    DeviceInfo,
    DeviceMemory,
    Event,
    FakeDevice,
    Stream,
    cuda_ordinals,
    is_cuda_device,
    normalize_pci,
    normalize_uuid,
)

__all__ = [
    "IPC_HANDLE_BYTES",
    "CudaApi",
    "CudaError",
    "DeviceInfo",
    "DeviceMemory",
    "Event",
    "FakeDevice",
    "Stream",
    "cuda_ordinals",
    "is_cuda_device",
    "normalize_pci",
    "normalize_uuid",
    "real_api",
]


_REAL: list[CudaApi | None] = []


def real_api() -> CudaApi | None:
    """cupy's CUDA, or None when cupy is missing or this process sees no device.

    One per process: CUDA contexts are per process, and the client opens each arena once
    per process, keyed by this object.
    """
    if not _REAL:
        from tensorferry.cuda.cupy_api import CupyCudaApi

        _REAL.append(CupyCudaApi.create_or_none())
    return _REAL[0]
