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
- Memory exportable as a descriptor (the VMM calls, a memfd each): ``fake_vmm``.

Select it explicitly: ``[cuda] api = "fake"`` in the daemon's config, and
``Client(cuda=FakeCudaApi(...))`` or ``$TENSORFERRY_FAKE_CUDA`` in a worker.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from tensorferry.cuda import fake_memory
from tensorferry.cuda.api import (
    CudaApi,
    CudaError,
    DeviceInfo,
    DeviceMemory,
    Event,
    FakeDevice,
    Stream,
)
from tensorferry.cuda.fake_memory import PREFIX, HostRange, Mapping
from tensorferry.cuda.fake_streams import FakeEvent, FakeStream
from tensorferry.cuda.fake_vmm import FakeVmm, VmmMapping

if TYPE_CHECKING:
    import torch

#: This process's fake CUDA context: a handle exported here cannot be opened here. Read
#: at each call rather than handed to ``fake_memory`` once, so that tests can patch it to
#: play another process.
_CONTEXT = secrets.token_bytes(8)


class FakeCudaApi(FakeVmm, CudaApi):
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
        self._allocs: dict[int, Mapping] = {}
        self._imports: dict[int, Mapping] = {}
        self._vmm: dict[int, VmmMapping] = {}  # fake_vmm: exportable and imported
        self._host: dict[int, HostRange] = {}
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
        #: Devices this process holds a context on: CUDA creates one at a device's first
        #: use (memory, streams, events, registration), never for device queries.
        self.contexts: set[int] = set()
        #: Every device_synchronize, by ordinal (tests: a finalizer must call none).
        self.synchronized: list[int] = []
        #: Events created and not destroyed.
        self.events = 0

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

    def numa_node(self, ordinal: int) -> int:
        # What the config says, never the host's sysfs: a fake bus id may be a real device's.
        self._check_ordinal(ordinal)
        return self._devices[ordinal].numa_node

    def _check_sticky(self) -> None:
        if self.sticky is not None:
            raise CudaError(self.sticky)

    def _wait_busy(self) -> None:
        if self.busy:
            time.sleep(self.busy)

    def _check_ordinal(self, ordinal: int) -> None:
        if not 0 <= ordinal < len(self._infos):
            raise CudaError(f"cudaErrorInvalidDevice: invalid device ordinal {ordinal}")

    def _context(self, ordinal: int) -> None:
        self._check_ordinal(ordinal)
        self.contexts.add(ordinal)

    def context_active(self, ordinal: int) -> bool:
        self._check_ordinal(ordinal)
        return ordinal in self.contexts

    def _used(self, ordinal: int) -> int:
        mine = sum(m.size for m in self._allocs.values() if m.ordinal == ordinal)
        return mine + self._vmm_used(ordinal)

    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        self._context(ordinal)
        total = self._devices[ordinal].memory
        with self._lock:
            return total - self._used(ordinal), total

    def malloc(self, ordinal: int, nbytes: int) -> DeviceMemory:
        self._context(ordinal)
        self._check_sticky()
        self._wait_busy()
        with self._lock:
            if nbytes > self._devices[ordinal].memory - self._used(ordinal):
                raise CudaError("cudaErrorMemoryAllocation: out of memory")
            seq = next(self._seq)
        path = fake_memory.device_path(self.shm_dir, _CONTEXT, seq)
        mm, anchor, ptr = fake_memory.create_device_file(path, nbytes)
        raw = uuid.UUID(self._infos[ordinal].uuid.removeprefix("GPU-")).bytes
        with self._lock:
            self._allocs[ptr] = Mapping(ptr, nbytes, ordinal, raw, mm, anchor, path, seq)
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
            for m in (*self._allocs.values(), *self._imports.values(), *self._vmm.values()):
                if m.ptr <= ptr < m.ptr + m.size:
                    return m.ordinal
        raise CudaError(f"cudaErrorInvalidValue: {ptr:#x} is not device memory")

    # -- IPC -----------------------------------------------------------------------------

    def ipc_get_handle(self, mem: DeviceMemory) -> bytes:
        with self._lock:
            m = self._allocs.get(mem.ptr)
        if m is None:
            raise CudaError("cudaErrorInvalidValue: not the base of an allocation")
        return fake_memory.encode_handle(_CONTEXT, m.device_uuid, m.seq)

    def ipc_open(self, handle: bytes, ordinal: int) -> int:
        self._context(ordinal)
        context, device_uuid, seq = fake_memory.decode_handle(handle)
        if context == _CONTEXT:
            raise CudaError("cudaErrorDeviceUninitialized: invalid device context")
        with self._lock:
            for m in self._imports.values():
                if m.device_uuid == device_uuid and m.seq == seq:
                    m.refs += 1
                    return m.ptr
        mm, anchor, ptr = fake_memory.open_device_file(
            fake_memory.device_path(self.shm_dir, context, seq)
        )
        owner = uuid.UUID(bytes=device_uuid)
        where = next((d.ordinal for d in self._infos if d.uuid == f"GPU-{owner}"), -1)
        with self._lock:
            self._imports[ptr] = Mapping(ptr, len(mm), where, device_uuid, mm, anchor, seq=seq)
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

    def host_register(self, ptr: int, nbytes: int, ordinal: int | None = None) -> None:
        self._context(0 if ordinal is None else ordinal)
        with self._lock:
            fake_memory.register_host(self._host, ptr, nbytes)

    def host_unregister(self, ptr: int, ordinal: int | None = None) -> None:
        with self._lock:
            fake_memory.unregister_host(self._host, ptr)

    def pending_reads(self, ptr: int, nbytes: int) -> int:
        """Queued copies whose source overlaps [ptr, ptr + nbytes): a ring slot with any
        is not free to be written."""
        with self._lock:
            return sum(1 for s, n in self._inflight.values() if s < ptr + nbytes and ptr < s + n)

    # -- streams, copies, events ---------------------------------------------------------

    def stream_create(self, ordinal: int) -> Stream:
        self._context(ordinal)
        stream = FakeStream(ordinal, self._jitter, self._rng)
        self._streams.append(stream)
        return Stream(ordinal, stream)

    def stream_destroy(self, stream: Stream) -> None:
        stream.native.close()
        if stream.native in self._streams:  # not when close() came first
            self._streams.remove(stream.native)

    def streams(self, ordinal: int) -> list[FakeStream]:
        return [s for s in self._streams if s.ordinal == ordinal]

    def event_create(self, ordinal: int) -> Event:
        self._context(ordinal)
        with self._lock:
            self.events += 1
        return Event(ordinal, FakeEvent())

    def event_destroy(self, event: Event) -> None:
        with self._lock:
            self.events -= 1

    def memcpy_h2d_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        with self._lock:
            if self.fail_copy_at is not None:
                self.fail_copy_at -= 1
                if self.fail_copy_at <= 0:
                    self.fail_copy_at = None
                    raise CudaError("cudaErrorLaunchFailure: unspecified launch failure")
            devs = [*self._allocs.values(), *self._vmm.values()]
            host, dev = fake_memory.copy_ends(
                self._host.values(), devs, dst, src, nbytes, stream.ordinal
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
        self.synchronized.append(ordinal)
        self._check_sticky()
        for stream in self.streams(ordinal):
            stream.synchronize()

    def as_tensor(self, owner: object, ptr: int, nbytes: int, ordinal: int) -> torch.Tensor:
        return fake_memory.tensor_over(owner, ptr, nbytes)

    def read(self, ptr: int, nbytes: int) -> bytes:
        """Bytes of fake device memory (tests: what a D2H copy would return)."""
        return ctypes.string_at(ptr, nbytes)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        with self._lock:
            mappings = [*self._allocs.values(), *self._imports.values(), *self._vmm.values()]
            self._allocs.clear()
            self._vmm.clear()
            self._imports.clear()
            self._host.clear()
        fake_memory.release(mappings)
