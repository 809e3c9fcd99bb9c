"""The daemon's pinned rings: one per NUMA node that has GPUs, each sized to the link.

Where every GPU is on one node (or the nodes are unknown) there is one ring, as before.
Where GPUs sit on different sockets, each node gets a ring whose pages are on that node,
and a load fetches into the ring of its (first) target GPU, so its H2D copies read local
memory. Each ring is sized for the whole link (one load alone may use it), and the cap on
pinned bytes (``sizing``) covers all of them together.

The rings are laid out at daemon start (``plan_rings``: sysfs only, no CUDA call) and each is
pinned at the first load onto one of its GPUs (``CudaRuntime.open_devices``): registering
host memory creates a CUDA context, which a daemon serving only CPU arenas must not hold.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from tensorferry.cuda import CudaApi, DeviceInfo
from tensorferry.daemon.fetch.link import LinkRate
from tensorferry.daemon.gpu import numa
from tensorferry.daemon.gpu.ring import PinnedRing
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.daemon.gpu.sizing import RingSize, ring_size

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    node: int  # -1: unknown
    cpus: frozenset[int]  # where its pages are first touched (empty: anywhere)
    devices: tuple[DeviceInfo, ...]


def numa_groups(
    api: CudaApi, devices: Sequence[DeviceInfo], root: Path = numa.NODE_ROOT
) -> tuple[list[NodeGroup], str]:
    """The devices grouped by NUMA node, and why there is one group when there is."""
    nodes = {d.ordinal: api.numa_node(d.ordinal) for d in devices}
    distinct = sorted(set(nodes.values()))
    if len(distinct) == 1:
        node = distinct[0]
        cpus = numa.node_cpus(node, root) if node >= 0 else frozenset()
        if node < 0:
            return [NodeGroup(-1, cpus, tuple(devices))], "NUMA node unknown"
        if not cpus:
            return [NodeGroup(-1, cpus, tuple(devices))], (
                f"all GPUs on NUMA node {node}, whose CPUs this process may not run on"
            )
        return [NodeGroup(node, cpus, tuple(devices))], f"all GPUs on NUMA node {node}"
    unknown = [f"cuda:{o}" for o, n in nodes.items() if n < 0]
    if unknown:
        return [NodeGroup(-1, frozenset(), tuple(devices))], (
            f"one ring: the NUMA node of {', '.join(unknown)} is unknown"
        )
    groups = []
    for node in distinct:
        cpus = numa.node_cpus(node, root)
        if not cpus:
            return [NodeGroup(-1, frozenset(), tuple(devices))], (
                f"one ring: this process may not run on NUMA node {node}'s CPUs, so it "
                "cannot place memory there"
            )
        groups.append(NodeGroup(node, cpus, tuple(d for d in devices if nodes[d.ordinal] == node)))
    return groups, f"one ring per NUMA node ({len(groups)})"


class RingSet:
    def __init__(self, rings: Sequence[PinnedRing], by_ordinal: dict[int, PinnedRing],
                 size: RingSize, layout: str) -> None:  # fmt: skip
        self.rings = list(rings)
        self._by_ordinal = by_ordinal
        self.size = size
        #: Why the rings are laid out as they are (NUMA), for the log and Status.
        self.layout = layout

    @classmethod
    def single(cls, ring: PinnedRing) -> RingSet:
        """One ring for every device (benchmarks, tests)."""
        return cls([ring], {}, RingSize(ring.slots, "given"), "one ring")

    def __iter__(self) -> Iterator[PinnedRing]:
        return iter(self.rings)

    @property
    def slot_size(self) -> int:
        return self.rings[0].slot_size

    @property
    def slots(self) -> int:
        """Slots of the pinned rings (a ring is pinned at the first load onto its GPUs)."""
        return sum(r.slots for r in self.rings if r.is_open)

    @property
    def free(self) -> int:
        return sum(r.free for r in self.rings)

    @property
    def pinned_bytes(self) -> int:
        return sum(r.size for r in self.rings if r.is_open)

    def ring_of(self, device: DeviceInfo) -> PinnedRing:
        return self._by_ordinal.get(device.ordinal, self.rings[0])

    def for_targets(self, targets: Sequence[DeviceInfo]) -> PinnedRing:
        """The ring a load fetches into: its first GPU's. A load to GPUs on two sockets
        crosses the socket link for the others whichever ring it takes."""
        return self.ring_of(targets[0]) if targets else self.rings[0]

    def close(self) -> None:
        errors: list[BaseException] = []
        for ring in reversed(self.rings):
            try:
                ring.close()
            except Exception as exc:  # every ring is closed; the first failure is raised
                errors.append(exc)
        if errors:
            raise errors[0]


def plan_rings(
    api: CudaApi, devices: Sequence[DeviceInfo], settings: CudaSettings, *, slot_size: int,
    link: LinkRate, total_memory: int, node_root: Path = numa.NODE_ROOT,
) -> RingSet:  # fmt: skip
    """The rings, sized and placed but not yet pinned (no CUDA context is created)."""
    groups, layout = numa_groups(api, devices, node_root)
    size = ring_size(settings, slot_size, link, len(groups), total_memory)
    rings: list[PinnedRing] = []
    by_ordinal: dict[int, PinnedRing] = {}
    for group in groups:
        first = sum(r.slots for r in rings)
        ring = PinnedRing(api, size.slots, slot_size, node=group.node, first=first,
                          cpus=group.cpus)  # fmt: skip
        rings.append(ring)
        by_ordinal.update((d.ordinal, ring) for d in group.devices)
    ring_set = RingSet(rings, by_ordinal, size, layout)
    log.info("pinned rings: %d x %d slots of %d bytes, %d MiB pinned at the first load onto "
             "their GPUs (%s; %s)", len(rings), size.slots, slot_size,
             len(rings) * size.slots * slot_size >> 20, size.why, layout)  # fmt: skip
    return ring_set
