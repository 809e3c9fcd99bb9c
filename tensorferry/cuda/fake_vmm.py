"""Exportable device memory of the fake CUDA API: the virtual memory management (VMM)
calls that let a GPU arena outlive the process that made it (docs/cuda.md, "GPU arenas
that outlive the daemon").

The physical memory is a memfd: it lives while any descriptor of it or any mapping of it
lives, in whichever process, not while its creator does. That is what systemd's
descriptor store relies on for a GPU arena (issue #28). What each call stands for in the
CUDA driver API:

- ``mem_create_exportable``: ``cuMemCreate`` with ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``
  requested, ``cuMemAddressReserve`` + ``cuMemMap`` + ``cuMemSetAccess`` for the device,
  ``cuMemExportToShareableHandle`` (the returned descriptor, the caller's to close), then
  ``cuMemRelease`` of the allocation handle: from then on the mapping and the exported
  descriptors are what keep the memory.
- ``mem_import``: ``cuMemImportFromShareableHandle`` (the descriptor stays the caller's),
  ``cuMemAddressReserve`` + ``cuMemMap`` + ``cuMemSetAccess``, then ``cuMemRelease``.
- ``mem_release``: ``cuMemUnmap`` + ``cuMemAddressFree``; the memory goes when its last
  mapping and descriptor have gone.
- ``mem_granularity``: ``cuMemGetAllocationGranularity`` (sizes are multiples of it).

Stricter than CUDA where tensorferry would have a bug: an import is mapped only for the
device the memory is on (CUDA would map it for a peer), and a mapping that queued copies
still write cannot be released. ``mem_get_info`` counts what this process created, as for
``malloc``; an import is not counted, and neither is memory whose creator has gone (a
GPU's own count would still show it: to verify on hardware).

The cupy API (``CupyCudaApi``) implements none of these yet: they wait for defect 4 of
issue #27, and the daemon's GPU sink does not use them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
import uuid
from typing import TYPE_CHECKING

from tensorferry.cuda.api import CudaError, DeviceInfo, FakeDevice
from tensorferry.cuda.fake_memory import Mapping, map_file

#: cuMemGetAllocationGranularity's minimum on current GPUs.
GRANULARITY = 2 << 20
#: memfd name prefix; the device's UUID follows, so an importer knows where the memory is.
NAME_PREFIX = "tffakevmm."
#: What readlink(/proc/self/fd/N) gives for such a memfd.
_LINK_PREFIX = f"/memfd:{NAME_PREFIX}"


@dataclasses.dataclass(eq=False)
class VmmMapping(Mapping):
    #: Made here by mem_create_exportable (counted in mem_get_info), not imported.
    created: bool = False


def _device_of(fd: int) -> str:
    """The UUID of the device a fake exportable allocation is on, from its memfd's name."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        link = ""
    if not link.startswith(_LINK_PREFIX):
        raise CudaError(
            f"CUDA_ERROR_INVALID_VALUE: descriptor {fd} is not an exported allocation "
            f"({link or 'not open'})"
        )
    return link.removeprefix(_LINK_PREFIX).removesuffix(" (deleted)")


class FakeVmm:
    """The VMM calls of ``FakeCudaApi`` (a mixin: it uses the API's lock and devices)."""

    _lock: threading.Lock
    _devices: list[FakeDevice]
    _infos: list[DeviceInfo]
    _vmm: dict[int, VmmMapping]

    if TYPE_CHECKING:

        def _context(self, ordinal: int) -> None: ...
        def _check_sticky(self) -> None: ...
        def _used(self, ordinal: int) -> int: ...

    def mem_granularity(self, ordinal: int) -> int:
        self._context(ordinal)
        return GRANULARITY

    def _vmm_used(self, ordinal: int) -> int:
        """Bytes of exportable memory created here on the device; the caller holds the lock."""
        return sum(m.size for m in self._vmm.values() if m.created and m.ordinal == ordinal)

    def mem_create_exportable(self, ordinal: int, nbytes: int) -> tuple[int, int]:
        """(address, descriptor) of new device memory that another process can import;
        the descriptor is the caller's to close."""
        self._context(ordinal)
        self._check_sticky()
        if nbytes <= 0 or nbytes % GRANULARITY:
            raise CudaError(
                f"CUDA_ERROR_INVALID_VALUE: {nbytes} bytes is not a positive multiple of "
                f"the allocation granularity ({GRANULARITY})"
            )
        with self._lock:
            if nbytes > self._devices[ordinal].memory - self._used(ordinal):
                raise CudaError("CUDA_ERROR_OUT_OF_MEMORY: out of memory")
        gpu = self._infos[ordinal].uuid
        fd = os.memfd_create(NAME_PREFIX + gpu, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # physical memory now, as cuMemCreate
            # Its size is fixed, as an allocation's: no importer can shrink it under another.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mm, anchor, ptr = map_file(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        raw = uuid.UUID(gpu.removeprefix("GPU-")).bytes
        with self._lock:
            self._vmm[ptr] = VmmMapping(ptr, nbytes, ordinal, raw, mm, anchor, created=True)
        return ptr, fd

    def mem_import(self, fd: int, ordinal: int) -> int:
        """Map memory another process (or this one) exported, for device ``ordinal``;
        ``fd`` stays the caller's. Each import is a mapping of its own."""
        self._context(ordinal)
        self._check_sticky()
        gpu = _device_of(fd)
        here = self._infos[ordinal].uuid
        if gpu != here:
            raise CudaError(
                f"CUDA_ERROR_INVALID_DEVICE: the allocation is on {gpu}, not on device "
                f"{ordinal} ({here})"
            )
        mm, anchor, ptr = map_file(fd, os.fstat(fd).st_size)
        raw = uuid.UUID(gpu.removeprefix("GPU-")).bytes
        with self._lock:
            self._vmm[ptr] = VmmMapping(ptr, len(mm), ordinal, raw, mm, anchor)
        return ptr

    def mem_release(self, ptr: int) -> None:
        """Unmap what ``mem_create_exportable`` or ``mem_import`` mapped at ``ptr``."""
        self._check_sticky()
        with self._lock:
            m = self._vmm.get(ptr)
            if m is None:
                raise CudaError(f"CUDA_ERROR_INVALID_VALUE: {ptr:#x} is not a mapped allocation")
            if m.writes:
                raise CudaError(
                    f"fake CUDA: release of {ptr:#x} while {m.writes} queued copies still "
                    "write into it (undefined on a GPU)"
                )
            del self._vmm[ptr]
        m.unmap()

    @property
    def vmm_mappings(self) -> int:
        """Exportable or imported allocations this process maps."""
        with self._lock:
            return len(self._vmm)
