"""The narrow CUDA interface the daemon and the client use, and nothing more.

Everything tensorferry asks of CUDA goes through ``CudaApi``: one raw allocation per arena,
its IPC handle, host registration of the pinned ring, asynchronous host-to-device copies
on streams, events, and device identity (UUID, PCI bus id). Two implementations exist:
``CupyCudaApi`` (the real one, cupy imported lazily) and ``FakeCudaApi`` (CI: no GPU).
Keeping the surface this small is what lets the fake model it faithfully.

Streams and events are wrapped in small typed records (``Stream``, ``Event``) that carry
the device they belong to; ``native`` is the implementation's own object.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Size of a legacy ``cudaIpcMemHandle_t``.
IPC_HANDLE_BYTES = 64
#: Where a PCI device's NUMA node is (``<bus id>/numa_node``).
SYS_PCI = Path("/sys/bus/pci/devices")


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message starts with the CUDA error name."""

    @property
    def out_of_memory(self) -> bool:
        return "cudaErrorMemoryAllocation" in str(self)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    ordinal: int  # in this process's numbering (after CUDA_VISIBLE_DEVICES)
    uuid: str  # "GPU-xxxxxxxx-...": the same in every process
    pci_bus_id: str  # "0000:3b:00.0" (normalised by ``normalize_pci``)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One device allocation; ``ptr`` is its base, the address an IPC handle exports."""

    ordinal: int
    ptr: int
    size: int


@dataclasses.dataclass(eq=False, slots=True)
class Stream:
    ordinal: int
    native: Any


@dataclasses.dataclass(eq=False, slots=True)
class Event:
    ordinal: int
    native: Any


_CUDA_NAME = re.compile(r"cuda(?::(\d{1,4}))?")


def is_cuda_device(device: str) -> bool:
    """A device string meant for CUDA ("cuda", "cuda:N", or a comma list of them)."""
    return device == "cuda" or device.startswith("cuda:")


def cuda_ordinals(device: str) -> list[int | None] | None:
    """The ordinals a device string names: "cuda:1,cuda:3" -> [1, 3]; "cuda" -> [None]
    (the current device); None when the string is malformed."""
    ordinals: list[int | None] = []
    for name in device.split(","):
        m = _CUDA_NAME.fullmatch(name.strip())
        if m is None:
            return None
        ordinals.append(None if m.group(1) is None else int(m.group(1)))
    return ordinals


def normalize_uuid(value: str) -> str:
    """``GPU-<uuid>`` in lower case; raises ValueError for anything else."""
    return "GPU-" + str(uuid.UUID(value.strip().removeprefix("GPU-")))


def normalize_pci(value: str) -> str:
    """PCI bus ids compare equal across tools: nvidia-smi writes an 8-digit domain
    ("00000000:3B:00.0"), the CUDA runtime a 4-digit one ("0000:3b:00.0")."""
    parts = value.strip().lower().split(":")
    if len(parts) == 3:
        parts[0] = parts[0][-4:].rjust(4, "0")
    return ":".join(parts)


class CudaApi(abc.ABC):
    """The calls tensorferry makes. Every method may raise ``CudaError``."""

    #: "cupy" or "fake", for logs and messages.
    name: str

    @abc.abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """The devices this process sees, in its own numbering."""

    @abc.abstractmethod
    def malloc(self, ordinal: int, nbytes: int) -> DeviceMemory:
        """One raw allocation (never a pool's sub-block: its handle must cover only it)."""

    @abc.abstractmethod
    def free(self, mem: DeviceMemory) -> None: ...

    @abc.abstractmethod
    def mem_get_info(self, ordinal: int) -> tuple[int, int]:
        """(free, total) bytes of the device."""

    @abc.abstractmethod
    def ipc_get_handle(self, mem: DeviceMemory) -> bytes:
        """The 64-byte IPC handle of an allocation's base."""

    @abc.abstractmethod
    def ipc_open(self, handle: bytes, ordinal: int) -> int:
        """Map another process's allocation; fails in the exporting process itself."""

    @abc.abstractmethod
    def ipc_close(self, ptr: int, ordinal: int) -> None: ...

    @abc.abstractmethod
    def pointer_device(self, ptr: int) -> int:
        """The ordinal of the device that holds ``ptr`` (-1: none this process sees)."""

    @abc.abstractmethod
    def host_register(self, ptr: int, nbytes: int, ordinal: int | None = None) -> None:
        """Pin existing host memory for every device (portable): slow, so once per ring.
        ``ordinal``: the device whose context registers it (None: the current one)."""

    @abc.abstractmethod
    def host_unregister(self, ptr: int, ordinal: int | None = None) -> None:
        """Unpin; ``ordinal``: the device whose context registered it."""

    @abc.abstractmethod
    def stream_create(self, ordinal: int) -> Stream:
        """A non-blocking stream (no implicit sync with the legacy default stream)."""

    @abc.abstractmethod
    def stream_destroy(self, stream: Stream) -> None: ...

    @abc.abstractmethod
    def event_create(self, ordinal: int) -> Event:
        """An event without timing whose synchronize sleeps instead of spinning."""

    @abc.abstractmethod
    def event_destroy(self, event: Event) -> None: ...

    @abc.abstractmethod
    def memcpy_h2d_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        """Queue a copy from pinned host memory to device memory of ``stream``'s device."""

    @abc.abstractmethod
    def event_record(self, event: Event, stream: Stream) -> None:
        """The event completes once all work queued on ``stream`` before it has."""

    @abc.abstractmethod
    def event_query(self, event: Event) -> bool:
        """True when the last recorded work is done (or the event was never recorded)."""

    @abc.abstractmethod
    def event_synchronize(self, event: Event) -> None:
        """Block until the event completes; safe to call from any thread."""

    @abc.abstractmethod
    def stream_synchronize(self, stream: Stream) -> None: ...

    @abc.abstractmethod
    def device_synchronize(self, ordinal: int) -> None: ...

    @abc.abstractmethod
    def as_tensor(self, owner: object, ptr: int, nbytes: int, ordinal: int) -> torch.Tensor:
        """A flat uint8 tensor over [ptr, ptr + nbytes), zero copy, keeping ``owner``
        alive for as long as the tensor or any view of it lives."""

    def context_active(self, ordinal: int) -> bool | None:
        """Whether this process holds a CUDA context on the device (None: unknown)."""
        return None

    def bind_thread(self, ordinal: int) -> None:  # noqa: B027 (the fake has no threads' state)
        """Make ``ordinal`` the calling thread's device for good: for a thread of our own
        that makes CUDA calls for that device only (a copy stream's waiting thread)."""

    def current_device(self) -> int:
        """The ordinal "cuda" without an index means in this process."""
        return 0

    def close(self) -> None:  # noqa: B027 (optional: most implementations hold nothing)
        """Release what the implementation holds (threads, mappings)."""

    def numa_node(self, ordinal: int) -> int:
        """The NUMA node the device's PCI slot hangs off (-1: unknown, or one node only).

        Read from sysfs by the PCI bus id CUDA reports: CUDA itself does not say."""
        pci = self.devices()[ordinal].pci_bus_id
        try:
            return int((SYS_PCI / pci / "numa_node").read_text().strip())
        except (OSError, ValueError):
            return -1

    def device_by_uuid(self, gpu_uuid: str) -> DeviceInfo | None:
        want = gpu_uuid.lower()
        return next((d for d in self.devices() if d.uuid.lower() == want), None)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """A device of the fake CUDA API (``[cuda] fake_devices``): plain data, so config
    parsing needs no fake."""

    uuid: str
    memory: int = 1 << 30
    #: Derived from the UUID when empty, so daemon and workers agree without configuring it.
    pci_bus_id: str = ""
    #: The NUMA node the fake reports for the device (-1: unknown, as sysfs says without NUMA).
    numa_node: int = -1

    def info(self, ordinal: int) -> DeviceInfo:
        raw = uuid.UUID(self.uuid.removeprefix("GPU-")).bytes
        pci = self.pci_bus_id or f"0000:{raw[0]:02x}:{raw[1] % 32:02x}.0"
        return DeviceInfo(ordinal, normalize_uuid(self.uuid), normalize_pci(pci))
