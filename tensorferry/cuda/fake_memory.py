"""Memory of the fake CUDA API (``tensorferry.cuda.fake``): device memory as /dev/shm
files mapped at real addresses, the 64-byte IPC handles that name them, and the pinned
host ranges that copies may read.

A handle carries the exporting process's fake context, the device's UUID and the file's
sequence number, which is all another process needs to find and map the same file.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tensorferry.cuda.api import IPC_HANDLE_BYTES, CudaError

if TYPE_CHECKING:
    import torch

#: Name prefix of the files standing in for device memory (not ``tensorferry.``: those
#: are CPU arenas, swept by the daemon's own rules).
PREFIX = "tffakecuda."
MAGIC = b"TFFK"


@dataclasses.dataclass(eq=False)
class Mapping:
    ptr: int
    size: int
    ordinal: int  # -1: a device this process does not see
    device_uuid: bytes
    mm: mmap.mmap
    anchor: ctypes.c_char | None  # pins the buffer export that gives us the address
    path: Path | None = None  # allocations own their file; imports do not
    seq: int = 0
    refs: int = 1  # opens of an imported handle (CUDA refcounts them per context)
    writes: int = 0  # queued copies into it

    def unmap(self) -> None:
        self.anchor = None
        self.mm.close()


@dataclasses.dataclass(eq=False)
class HostRange:
    ptr: int
    size: int
    reads: int = 0  # queued copies out of it


def map_file(fd: int, size: int) -> tuple[mmap.mmap, ctypes.c_char, int]:
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)
    return mm, anchor, ctypes.addressof(anchor)


def device_path(shm_dir: Path, context: bytes, seq: int) -> Path:
    """The file of allocation ``seq`` made in fake context ``context``."""
    return shm_dir / f"{PREFIX}{context.hex()}.{seq}"


def create_device_file(path: Path, nbytes: int) -> tuple[mmap.mmap, ctypes.c_char, int]:
    """Create and map a new allocation's file; nothing is left behind if that fails."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return map_file(fd, nbytes)
    except BaseException:
        path.unlink()
        raise
    finally:
        os.close(fd)


def open_device_file(path: Path) -> tuple[mmap.mmap, ctypes.c_char, int]:
    """Map another context's allocation, failing as cudaIpcOpenMemHandle does once the
    exporter has freed it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CudaError("cudaErrorMapBufferObjectFailed: mapping of buffer object failed") from None
    try:
        return map_file(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def encode_handle(context: bytes, device_uuid: bytes, seq: int) -> bytes:
    handle = MAGIC + context + device_uuid + seq.to_bytes(8, "little")
    return handle.ljust(IPC_HANDLE_BYTES, b"\0")


def decode_handle(handle: bytes) -> tuple[bytes, bytes, int]:
    """(context, device UUID, sequence number) of a handle from ``encode_handle``."""
    if len(handle) != IPC_HANDLE_BYTES or not handle.startswith(MAGIC):
        raise CudaError("cudaErrorInvalidResourceHandle: invalid resource handle")
    return handle[4:12], handle[12:28], int.from_bytes(handle[28:36], "little")


def register_host(ranges: dict[int, HostRange], ptr: int, nbytes: int) -> None:
    """cudaHostRegister's bookkeeping; the caller holds the lock that guards ``ranges``."""
    for r in ranges.values():
        if r.ptr < ptr + nbytes and ptr < r.ptr + r.size:
            raise CudaError(
                "cudaErrorHostMemoryAlreadyRegistered: part or all of the requested "
                "memory range is already mapped"
            )
    ranges[ptr] = HostRange(ptr, nbytes)


def unregister_host(ranges: dict[int, HostRange], ptr: int) -> None:
    """cudaHostUnregister's bookkeeping; the caller holds the lock that guards ``ranges``."""
    r = ranges.get(ptr)
    if r is None:
        raise CudaError("cudaErrorHostMemoryNotRegistered: pointer not registered")
    if r.reads:
        raise CudaError(
            f"fake CUDA: unregister of {ptr:#x} while {r.reads} queued copies still read from it"
        )
    del ranges[ptr]


def copy_ends(
    hosts: Iterable[HostRange],
    allocs: Iterable[Mapping],
    dst: int,
    src: int,
    nbytes: int,
    ordinal: int,
) -> tuple[HostRange, Mapping]:
    """The pinned range an H2D copy reads and the allocation it writes, checked as CUDA
    (and, for pageable sources, more strictly) checks them."""
    end = src + nbytes
    host = next((r for r in hosts if r.ptr <= src and end <= r.ptr + r.size), None)
    if host is None:
        raise CudaError(
            f"fake CUDA: copy from unregistered (pageable) host memory at {src:#x}; a "
            "GPU would stage it synchronously"
        )
    end = dst + nbytes
    dev = next((m for m in allocs if m.ptr <= dst and end <= m.ptr + m.size), None)
    if dev is None or dev.ordinal != ordinal:
        raise CudaError(
            "cudaErrorInvalidValue: invalid argument (destination is not memory of the "
            "stream's device)"
        )
    return host, dev


def release(mappings: Iterable[Mapping]) -> None:
    """Unmap each mapping, and remove the files of those that are allocations."""
    for m in mappings:
        m.unmap()
        if m.path is not None:
            m.path.unlink(missing_ok=True)


def tensor_over(owner: object, ptr: int, nbytes: int) -> torch.Tensor:
    # A CPU tensor over the mapping: numpy keeps ``owner`` (the array's base) alive.
    import numpy as np
    import torch

    owner.__array_interface__ = {  # type: ignore[attr-defined]
        "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
    }  # fmt: skip
    return torch.from_numpy(np.asarray(owner))
