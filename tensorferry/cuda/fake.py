"""A faithful stand-in for the CUDA calls in ``CudaApi``, for machines without a GPU (CI).

- "Device memory" is one /dev/shm file per allocation, mapped at a real address: copies
  really move bytes, and another process can map the same file.
- Each stream is a FIFO that its own thread works through, after the caller has returned.
  With ``jitter``, every operation first waits a random moment, so copies on different
  streams complete out of order, as with several copy engines. An event completes only
  when its stream reaches it, that is after every copy queued before it.
- The 64-byte IPC handle names the file and the exporting process's "context"; opening a
  handle in the process that exported it fails as CUDA does ("invalid device context").
- Stricter than CUDA where CUDA would be silently slow or undefined, to catch our own
  bugs: a copy from unregistered (pageable) host memory, freeing memory that queued copies
  still write, and unregistering host memory that queued copies still read all raise.

Select it explicitly: ``[cuda] api = "fake"`` in the daemon's config, and
``Client(cuda=FakeCudaApi(...))`` or ``$TENSORFERRY_FAKE_CUDA`` in a worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import mmap
import os
import random
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from tensorferry.cuda.api import (
    IPC_HANDLE_BYTES,
    CudaApi,
    CudaError,
    DeviceInfo,
    DeviceMemory,
    Event,
    Stream,
    normalize_pci,
    normalize_uuid,
)
from tensorferry.cuda.fake_streams import FakeEvent, FakeStream

if TYPE_CHECKING:
    import torch

#: This process's fake CUDA context: a handle exported here cannot be opened here.
_CONTEXT = secrets.token_bytes(8)
_MAGIC = b"TFFK"
#: Name prefix of the files standing in for device memory (not ``tensorferry.``: those
#: are CPU arenas, swept by the daemon's own rules).
PREFIX = "tffakecuda."


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    uuid: str
    memory: int = 1 << 30
    #: Derived from the UUID when empty, so daemon and workers agree without configuring it.
    pci_bus_id: str = ""

    def info(self, ordinal: int) -> DeviceInfo:
        raw = uuid.UUID(self.uuid.removeprefix("GPU-")).bytes
        pci = self.pci_bus_id or f"0000:{raw[0]:02x}:{raw[1] % 32:02x}.0"
        return DeviceInfo(ordinal, normalize_uuid(self.uuid), normalize_pci(pci))


@dataclasses.dataclass(eq=False)
class _Mapping:
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
class _HostRange:
    ptr: int
    size: int
    reads: int = 0  # queued copies out of it


def _map_file(fd: int, size: int) -> tuple[mmap.mmap, ctypes.c_char, int]:
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)
    return mm, anchor, ctypes.addressof(anchor)


class FakeCudaApi(CudaApi):
    name = "fake"

    def __init__(
        self, devices: list[FakeDevice], *, jitter: float = 0.0, seed: int | None = None,
        shm_dir: Path = Path("/dev/shm"),
    ) -> None:  # fmt: skip
        self._devices = list(devices)
        self._infos = [d.info(i) for i, d in enumerate(self._devices)]
        self._jitter = jitter
        self._rng = random.Random(seed)
        self.shm_dir = shm_dir
        self._lock = threading.Lock()
        self._allocs: dict[int, _Mapping] = {}
        self._imports: dict[int, _Mapping] = {}
        self._host: dict[int, _HostRange] = {}
        self._streams: list[FakeStream] = []
        self._seq = itertools.count(1)
        self._copies = itertools.count(1)
        self._inflight: dict[int, tuple[int, int]] = {}  # copy id -> (src, nbytes)
        #: Tests: the Nth copy from now on (1 = the next) fails when it is queued.
        self.fail_copy_at: int | None = None
        #: Tests: seconds malloc and free take (cudaFree may wait for a busy device).
        self.busy = 0.0
        #: Tests: a sticky error ("cudaErrorIllegalAddress: ..."): once set, every call
        #: that reports errors raises it, as each CUDA call does in a broken context.
        self.sticky: str | None = None

    @property
    def file_prefix(self) -> str:
        """The path prefix of this process's device-memory files."""
        return str(self.shm_dir / f"{PREFIX}{_CONTEXT.hex()}.")

    @classmethod
    def from_uuids(cls, uuids: list[str]) -> FakeCudaApi:
        """A worker's view: these devices, in this process's numbering."""
        return cls([FakeDevice(u) for u in uuids])

    # -- devices and memory --------------------------------------------------------------

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def _check_sticky(self) -> None:
        if self.sticky is not None:
            raise CudaError(self.sticky)

    def _wait_busy(self) -> None:
        if self.busy:
            time.sleep(self.busy)

    def _check_ordinal(self, ordinal: int) -> None:
        if not 0 <= ordinal < len(self._infos):
            raise CudaError(f"cudaErrorInvalidDevice: invalid device ordinal {ordinal}")

    def _used(self, ordinal: int) -> int:
        return sum(m.size for m in self._allocs.values() if m.ordinal == ordinal)

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        self._check_ordinal(ordinal)
        total = self._devices[ordinal].memory
        with self._lock:
            return total - self._used(ordinal), total

    def malloc(self, ordinal: int, nbytes: int) -> DeviceMemory:
        self._check_ordinal(ordinal)
        self._check_sticky()
        self._wait_busy()
        with self._lock:
            if nbytes > self._devices[ordinal].memory - self._used(ordinal):
                raise CudaError("cudaErrorMemoryAllocation: out of memory")
            seq = next(self._seq)
        path = self.shm_dir / f"{PREFIX}{_CONTEXT.hex()}.{seq}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            mm, anchor, ptr = _map_file(fd, nbytes)
        except BaseException:
            path.unlink()
            raise
        finally:
            os.close(fd)
        raw = uuid.UUID(self._infos[ordinal].uuid.removeprefix("GPU-")).bytes
        with self._lock:
            self._allocs[ptr] = _Mapping(ptr, nbytes, ordinal, raw, mm, anchor, path, seq)
        return DeviceMemory(ordinal, ptr, nbytes)

    def free(self, mem: DeviceMemory) -> None:
        # As cudaFree (cupy's runtime.free): reports failure, and may wait for the device.
        self._check_sticky()
        self._wait_busy()
        with self._lock:
            m = self._allocs.get(mem.ptr)
            if m is None:
                raise CudaError("cudaErrorInvalidValue: invalid argument (not allocated)")
            if m.writes:
                raise CudaError(
                    f"fake CUDA: free of {mem.ptr:#x} while {m.writes} queued copies still "
                    "write into it (undefined on a GPU)"
                )
            del self._allocs[mem.ptr]
        m.unmap()
        assert m.path is not None
        m.path.unlink(missing_ok=True)

    def pointer_device(self, ptr: int) -> int:
        with self._lock:
            for m in (*self._allocs.values(), *self._imports.values()):
                if m.ptr <= ptr < m.ptr + m.size:
                    return m.ordinal
        raise CudaError(f"cudaErrorInvalidValue: {ptr:#x} is not device memory")

    # -- IPC -----------------------------------------------------------------------------

    def ipc_get_handle(self, mem: DeviceMemory) -> bytes:
        with self._lock:
            m = self._allocs.get(mem.ptr)
        if m is None:
            raise CudaError("cudaErrorInvalidValue: not the base of an allocation")
        handle = _MAGIC + _CONTEXT + m.device_uuid + m.seq.to_bytes(8, "little")
        return handle.ljust(IPC_HANDLE_BYTES, b"\0")

    def ipc_open(self, handle: bytes, ordinal: int) -> int:
        self._check_ordinal(ordinal)
        if len(handle) != IPC_HANDLE_BYTES or not handle.startswith(_MAGIC):
            raise CudaError("cudaErrorInvalidResourceHandle: invalid resource handle")
        context, device_uuid = handle[4:12], handle[12:28]
        seq = int.from_bytes(handle[28:36], "little")
        if context == _CONTEXT:
            raise CudaError("cudaErrorDeviceUninitialized: invalid device context")
        with self._lock:
            for m in self._imports.values():
                if m.device_uuid == device_uuid and m.seq == seq:
                    m.refs += 1
                    return m.ptr
        path = self.shm_dir / f"{PREFIX}{context.hex()}.{seq}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CudaError(
                "cudaErrorMapBufferObjectFailed: mapping of buffer object failed"
            ) from None
        try:
            mm, anchor, ptr = _map_file(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        owner = uuid.UUID(bytes=device_uuid)
        where = next((d.ordinal for d in self._infos if d.uuid == f"GPU-{owner}"), -1)
        with self._lock:
            self._imports[ptr] = _Mapping(ptr, len(mm), where, device_uuid, mm, anchor, seq=seq)
        return ptr

    def ipc_close(self, ptr: int, ordinal: int) -> None:
        with self._lock:
            m = self._imports.get(ptr)
            if m is None:
                raise CudaError("cudaErrorInvalidValue: not an opened IPC mapping")
            m.refs -= 1
            if m.refs:
                return
            del self._imports[ptr]
        m.unmap()

    @property
    def open_imports(self) -> int:
        with self._lock:
            return len(self._imports)

    # -- pinned host memory --------------------------------------------------------------

    def host_register(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            for r in self._host.values():
                if r.ptr < ptr + nbytes and ptr < r.ptr + r.size:
                    raise CudaError(
                        "cudaErrorHostMemoryAlreadyRegistered: part or all of the requested "
                        "memory range is already mapped"
                    )
            self._host[ptr] = _HostRange(ptr, nbytes)

    def host_unregister(self, ptr: int) -> None:
        with self._lock:
            r = self._host.get(ptr)
            if r is None:
                raise CudaError("cudaErrorHostMemoryNotRegistered: pointer not registered")
            if r.reads:
                raise CudaError(
                    f"fake CUDA: unregister of {ptr:#x} while {r.reads} queued copies still "
                    "read from it"
                )
            del self._host[ptr]

    def pending_reads(self, ptr: int, nbytes: int) -> int:
        """Queued copies whose source overlaps [ptr, ptr + nbytes): a ring slot with any
        is not free to be written."""
        with self._lock:
            return sum(1 for s, n in self._inflight.values() if s < ptr + nbytes and ptr < s + n)

    # -- streams, copies, events ---------------------------------------------------------

    def stream_create(self, ordinal: int) -> Stream:
        self._check_ordinal(ordinal)
        stream = FakeStream(ordinal, self._jitter, self._rng)
        self._streams.append(stream)
        return Stream(ordinal, stream)

    def streams(self, ordinal: int) -> list[FakeStream]:
        return [s for s in self._streams if s.ordinal == ordinal]

    def event_create(self, ordinal: int) -> Event:
        self._check_ordinal(ordinal)
        return Event(ordinal, FakeEvent())

    def memcpy_h2d_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        with self._lock:
            if self.fail_copy_at is not None:
                self.fail_copy_at -= 1
                if self.fail_copy_at <= 0:
                    self.fail_copy_at = None
                    raise CudaError("cudaErrorLaunchFailure: unspecified launch failure")
            end = src + nbytes
            host = next((r for r in self._host.values() if r.ptr <= src and end <= r.ptr + r.size),
                        None)  # fmt: skip
            if host is None:
                raise CudaError(
                    f"fake CUDA: copy from unregistered (pageable) host memory at {src:#x}; a "
                    "GPU would stage it synchronously"
                )
            end = dst + nbytes
            dev = next((m for m in self._allocs.values() if m.ptr <= dst and end <= m.ptr + m.size),
                       None)  # fmt: skip
            if dev is None or dev.ordinal != stream.ordinal:
                raise CudaError(
                    "cudaErrorInvalidValue: invalid argument (destination is not memory of the "
                    "stream's device)"
                )
            copy = next(self._copies)
            self._inflight[copy] = (src, nbytes)
            host.reads += 1
            dev.writes += 1

        def run() -> None:
            ctypes.memmove(dst, src, nbytes)
            with self._lock:
                del self._inflight[copy]
                host.reads -= 1
                dev.writes -= 1

        stream.native.enqueue(run)

    def event_record(self, event: Event, stream: Stream) -> None:
        if event.ordinal != stream.ordinal:
            raise CudaError("cudaErrorInvalidResourceHandle: event and stream on other devices")
        event.native.record(stream.native)

    def event_query(self, event: Event) -> bool:
        # As cudaEventQuery: not ready is False, any other error raises.
        self._check_sticky()
        return bool(event.native.done())

    def event_synchronize(self, event: Event) -> None:
        self._check_sticky()
        event.native.wait()

    def stream_synchronize(self, stream: Stream) -> None:
        self._check_sticky()
        stream.native.synchronize()

    def device_synchronize(self, ordinal: int) -> None:
        self._check_sticky()
        for stream in self.streams(ordinal):
            stream.synchronize()

    def as_tensor(self, owner: object, ptr: int, nbytes: int, ordinal: int) -> torch.Tensor:
        # A CPU tensor over the mapping: numpy keeps ``owner`` (the array's base) alive.
        import numpy as np
        import torch

        owner.__array_interface__ = {  # type: ignore[attr-defined]
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
        }  # fmt: skip
        return torch.from_numpy(np.asarray(owner))

    def read(self, ptr: int, nbytes: int) -> bytes:
        """Bytes of fake device memory (tests: what a D2H copy would return)."""
        return ctypes.string_at(ptr, nbytes)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        with self._lock:
            mappings = [*self._allocs.values(), *self._imports.values()]
            self._allocs.clear()
            self._imports.clear()
            self._host.clear()
        for m in mappings:
            m.unmap()
            if m.path is not None:
                m.path.unlink(missing_ok=True)
