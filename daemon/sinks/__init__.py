"""Device sinks: where fetched bytes end up (CpuShmSink; CudaSink on GPU hosts).

Both sinks allocate arenas, release them and report what they hold; each arena describes
itself to workers (``grant``: the Ready event's arena field). The registry releases an
arena through ``Sinks.release`` without asking what kind it is.
"""

from __future__ import annotations

from typing import Any, Protocol

from tensorferry.daemon.devices import CPU


class Arena(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    def grant(self) -> dict[str, Any]:
        """The Ready event's grant: its oneof field name and message."""
        ...


class Sink(Protocol):
    @property
    def used(self) -> int: ...
    @property
    def arena_names(self) -> list[str]: ...
    def release(self, arena: Any, *, recycle: bool = True) -> None: ...


class Sinks:
    """The sink of each device: the host's shared memory, and the GPUs when there are any."""

    def __init__(self, cpu: Sink, gpu: Sink | None) -> None:
        self.cpu = cpu
        self.gpu = gpu

    def for_device(self, device: str) -> Sink:
        if device == CPU:
            return self.cpu
        assert self.gpu is not None, f"{device}: no GPU sink on this host"
        return self.gpu
