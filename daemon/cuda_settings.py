"""The ``[cuda]`` section of the daemon's config: which CUDA, the pinned ring, copy streams.

``config.py`` reads the file and calls ``cuda_settings``; this module only validates, and
raises ValueError with the key and the rule (config.py turns it into ConfigError).

    [cuda]
    api = "auto"            # "auto": cupy if it imports and sees a GPU; "cupy"; "fake"; "off"
    ring_slots = 48         # pinned host slots, allocated and registered once at start
    slot_size = "8MiB"      # default: [s3] chunk_size (one range GET fills one slot)
    copy_streams = 2        # per GPU
    reserve = "1GiB"        # GPU memory arenas leave free for the workers

    [[cuda.fake_devices]]   # api = "fake" only (CI): devices the fake pretends to have
    uuid = "GPU-8f3c...."
    memory = "1GiB"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tensorferry.cuda import FakeDevice, normalize_uuid

APIS = ("auto", "cupy", "fake", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CudaSettings:
    #: "auto" (cupy when it imports and sees a GPU, else CPU only), "cupy" (required),
    #: "fake" (the in-process stand-in CI uses; never chosen by "auto"), or "off".
    api: str = "auto"
    #: Pinned host slots the fetchers fill. Slots stay busy until their H2D copies are
    #: done, so more slots than parallel GETs keep the link busy.
    ring_slots: int = 48
    #: Bytes per slot; 0 means the S3 chunk size.
    slot_size: int = 0
    #: Copy streams per GPU; consecutive slots alternate between them.
    copy_streams: int = 2
    #: GPU memory each device keeps free when the daemon places an arena.
    reserve: int = 1 << 30
    #: api = "fake" only: the devices, in the daemon's numbering.
    fake_devices: tuple[FakeDevice, ...] = ()
    #: api = "fake" only: each fake copy first waits up to this many seconds, so copies
    #: on different streams complete out of order.
    fake_jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"cuda.api: must be one of {', '.join(APIS)}, got {self.api!r}")
        if not 2 <= self.ring_slots <= 4096:
            raise ValueError(f"cuda.ring_slots: must be 2..4096, got {self.ring_slots}")
        if self.slot_size and not 64 * 1024 <= self.slot_size <= 1 << 30:
            raise ValueError(f"cuda.slot_size: must be 64KiB..1GiB, got {self.slot_size}")
        if not 1 <= self.copy_streams <= 16:
            raise ValueError(f"cuda.copy_streams: must be 1..16, got {self.copy_streams}")
        if self.api == "fake" and not self.fake_devices:
            raise ValueError('cuda.fake_devices: api = "fake" needs at least one device')
        uuids = [d.uuid for d in self.fake_devices]
        if len(set(uuids)) != len(uuids):
            raise ValueError("cuda.fake_devices: device UUIDs must be unique")


def _fake_device(entry: Any, size: Callable[[object, str], int]) -> FakeDevice:
    if not isinstance(entry, dict) or "uuid" not in entry:
        raise ValueError("cuda.fake_devices: each entry needs a uuid")
    try:
        gpu_uuid = normalize_uuid(str(entry["uuid"]))
    except ValueError:
        raise ValueError(
            f"cuda.fake_devices: {entry['uuid']!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-...)"
        ) from None
    memory = size(entry.get("memory", 1 << 30), "cuda.fake_devices.memory")
    return FakeDevice(gpu_uuid, memory, str(entry.get("pci_bus_id", "")))


def cuda_settings(section: dict[str, Any], size: Callable[[object, str], int]) -> CudaSettings:
    """Settings from the ``[cuda]`` table; ``size`` parses byte sizes ("8MiB")."""
    fakes = section.get("fake_devices", [])
    if not isinstance(fakes, list):
        raise ValueError("cuda.fake_devices: expected an array of tables ([[cuda.fake_devices]])")
    return CudaSettings(
        api=str(section.get("api", "auto")),
        ring_slots=int(section.get("ring_slots", 48)),
        slot_size=size(section.get("slot_size", 0), "cuda.slot_size"),
        copy_streams=int(section.get("copy_streams", 2)),
        reserve=size(section.get("reserve", 1 << 30), "cuda.reserve"),
        fake_devices=tuple(_fake_device(e, size) for e in fakes),
        fake_jitter=float(section.get("fake_jitter", 0.0)),
    )
