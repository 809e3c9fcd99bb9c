"""The ``[cuda]`` section of the daemon's config: which CUDA, the pinned ring, copy streams.

Its keys, defaults, parsers and per-key rules are in the schema (``config_keys.KEYS``, section
"cuda"); this module adds the rules that span keys. Every refusal is a ConfigError naming
the key.

    [cuda]
    api = "auto"            # "auto": cupy if it imports and sees a GPU; "cupy"; "fake"; "off"
    ring_slots = "auto"     # pinned host slots per ring (one ring per NUMA node with GPUs)
    ring_bytes = 0          # cap on all rings' pinned bytes under "auto" (0: MemTotal / 16)
    slot_size = "8MiB"      # default: [s3] chunk_size (one range GET fills one slot)
    copy_streams = 2        # per GPU
    reserve = "1GiB"        # GPU memory arenas leave free for the workers

    [[cuda.fake_devices]]   # api = "fake" only (CI): devices the fake pretends to have
    uuid = "GPU-8f3c...."
    memory = "1GiB"
    numa_node = 0           # the node the fake reports (default -1: unknown)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tensorferry.cuda import FakeDevice
from tensorferry.daemon.config.keys import CUDA_APIS, check, default, read
from tensorferry.errors import ConfigError

#: The accepted values of ``[cuda] api``.
APIS = CUDA_APIS


@dataclasses.dataclass(frozen=True, kw_only=True)
class CudaSettings:
    """``[cuda]``; what each field means is documented in ``config_keys.KEYS``.

    ``slot_size`` 0 means the S3 chunk size; ``fake_devices`` are in the daemon's numbering.
    """

    api: str = default("cuda.api")
    ring_slots: int = default("cuda.ring_slots")  # 0: "auto", sized to the link
    ring_bytes: int = default("cuda.ring_bytes")
    slot_size: int = default("cuda.slot_size")
    copy_streams: int = default("cuda.copy_streams")
    reserve: int = default("cuda.reserve")
    fake_devices: tuple[FakeDevice, ...] = default("cuda.fake_devices")
    fake_jitter: float = default("cuda.fake_jitter")

    def __post_init__(self) -> None:
        check(self, "cuda")
        if self.api == "fake" and not self.fake_devices:
            raise ConfigError('cuda.fake_devices: api = "fake" needs at least one device')
        uuids = [d.uuid for d in self.fake_devices]
        if len(set(uuids)) != len(uuids):
            raise ConfigError("cuda.fake_devices: device UUIDs must be unique")


def cuda_settings(data: dict[str, Any]) -> CudaSettings:
    """Settings from a config file's ``[cuda]`` table (``data``: the whole file)."""
    return CudaSettings(**read(data, "cuda"))
