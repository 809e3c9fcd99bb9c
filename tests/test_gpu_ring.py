"""The pinned rings: sized to the link, one per NUMA node with GPUs, in a shareable memfd.

On the fake CUDA API; the NUMA nodes are a sysfs tree the test writes (each node's
``cpulist``) and the node each fake GPU reports (``FakeDevice.numa_node``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tensorferry.cuda import FakeDevice
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.config.settings import S3Settings, Settings, load_settings
from tensorferry.daemon.doctor import check_ring
from tensorferry.daemon.fetch.link import LinkRate
from tensorferry.daemon.gpu import numa
from tensorferry.daemon.gpu.load import load_plan_cuda
from tensorferry.daemon.gpu.ring import PinnedRing
from tensorferry.daemon.gpu.rings import numa_groups
from tensorferry.daemon.gpu.runtime import CudaRuntime, open_cuda
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.daemon.gpu.sizing import ring_size
from tests._cuda_fake_helpers import GPU_A, GPU_B, MEMORY, SLOT, expected, model, until
from tests.conftest import daemon_env, running_daemon

T = TypeVar("T")
MiB = 1 << 20
GBIT = 1e9 / 8  # bytes per second in one Gb/s
AUTO = CudaSettings()  # ring_slots "auto", copy_streams 2


def test_auto_slots_are_the_gets_the_link_needs_plus_the_copy_streams() -> None:
    def slots(gbits: float, **kw: Any) -> int:
        link = LinkRate(gbits * GBIT, "[s3] target_rate", **kw)
        return ring_size(AUTO, 8 * MiB, link, 1, 1 << 40).slots

    # ceil(1.25 GB/s x (8 MiB / 90 MB/s) / 8 MiB) = 14 GETs, + 2 x 2 copy streams.
    assert slots(10) == 18
    # ceil(12.5 GB/s / 90 MB/s) = 139 GETs, + 4: the ~150 x 8 MiB a 100 Gb/s NIC needs.
    assert slots(100) == 143
    assert slots(400) == 560
    assert slots(1) == 16  # the floor
    assert slots(10_000) == 1024  # the ceiling
    assert slots(10, assumed=True) == 48  # no NIC says: never under the old fixed ring
    size = ring_size(AUTO, 8 * MiB, LinkRate(100 * GBIT, "[s3] target_rate"), 1, 1 << 40)
    assert size.why == (
        "auto: 139 GETs in flight for 100 Gb/s ([s3] target_rate) at 90 MB/s each + 4 for the "
        "copy streams"
    )
    # The slot size cancels out: the same GETs in flight at 16 MiB.
    assert ring_size(AUTO, 16 * MiB, LinkRate(100 * GBIT, "x"), 1, 1 << 40).slots == 143


def test_pinned_bytes_are_capped_and_an_explicit_ring_slots_wins() -> None:
    link = LinkRate(100 * GBIT, "[s3] target_rate")
    capped = CudaSettings(ring_bytes=256 * MiB)
    assert ring_size(capped, 8 * MiB, link, 1, 1 << 40).slots == 32
    two = ring_size(capped, 8 * MiB, link, 2, 1 << 40)
    assert two.slots == 16  # two NUMA nodes share the cap
    assert two.why.endswith("; capped by [cuda] ring_bytes (256 MiB for 2 ring(s))")
    # Without ring_bytes: MemTotal / 16, here 16 GiB / 16 = 128 slots of 8 MiB.
    by_memory = ring_size(AUTO, 8 * MiB, link, 1, 16 << 30)
    assert by_memory.slots == 128
    assert by_memory.why.endswith("; capped by MemTotal / 16 (1024 MiB for 1 ring(s))")
    assert ring_size(AUTO, 8 * MiB, link, 1, 0).slots == 143  # MemTotal unknown: no cap
    explicit = CudaSettings(ring_slots=300, ring_bytes=64 * MiB)
    assert ring_size(explicit, 8 * MiB, link, 2, 1 << 30) == ring_size(
        explicit, 8 * MiB, LinkRate(1 * GBIT, "x"), 1, 1 << 40
    )
    assert ring_size(explicit, 8 * MiB, link, 2, 1 << 30).slots == 300


def test_doctor_shows_the_ring_an_auto_config_gets(tmp_path: Path) -> None:
    lines: list[tuple[str, str, str]] = []
    fake = CudaSettings(api="fake", fake_devices=(FakeDevice(GPU_A),), ring_bytes=4 << 30)
    for settings in (
        Settings(s3=S3Settings(target_rate=12_500_000_000), cuda=fake),
        Settings(cuda=CudaSettings(api="off")),  # no GPU ring to speak of
    ):
        check_ring(settings, lambda *line: lines.append(line), tmp_path)  # no NIC reports
    assert lines == [(
        "ok", "pinned ring: 143 slots x 8MiB = 1144 MiB per NUMA node with GPUs (auto: 139 "
        "GETs in flight for 100 Gb/s ([s3] target_rate) at 90 MB/s each + 4 for the copy "
        "streams)", "",
    )]  # fmt: skip


def test_ring_slots_is_auto_by_default_and_in_a_config(tmp_path: Path) -> None:
    config = tmp_path / "tf.toml"
    config.write_text("[cuda]\n")
    assert load_settings(config).cuda.ring_slots == 0
    config.write_text('[cuda]\nring_slots = "auto"\nring_bytes = "2GiB"\n')
    cuda = load_settings(config).cuda
    assert (cuda.ring_slots, cuda.ring_bytes) == (0, 2 << 30)
    config.write_text("[cuda]\nring_slots = 64\n")
    assert load_settings(config).cuda.ring_slots == 64
    config.write_text(
        f'[cuda]\napi = "fake"\n[[cuda.fake_devices]]\nuuid = "{GPU_A}"\nnuma_node = 1\n'
    )
    assert load_settings(config).cuda.fake_devices[0].numa_node == 1


async def test_the_ring_is_a_sealed_memfd_another_mapping_shares() -> None:
    api = FakeCudaApi([FakeDevice(GPU_A, MEMORY)])
    ring = PinnedRing(api, 3, SLOT).open()
    try:
        assert (ring.size, ring.fd >= 0) == (3 * SLOT, True)
        assert os.readlink(f"/proc/self/fd/{ring.fd}") == "/memfd:tensorferry-ring (deleted)"
        slot = await ring.acquire()
        assert ring.ptr <= slot.ptr < ring.ptr + ring.size
        # What another process would do with the fd: map it, and write a slot's range.
        other = mmap.mmap(ring.fd, ring.size, mmap.MAP_SHARED)
        try:
            start = slot.offset
            assert start == slot.ptr - ring.ptr
            other[start : start + 5] = b"range"
            assert bytes(slot.view[:5]) == b"range"
            slot.view[SLOT - 4 :] = b"back"
            assert other[start + SLOT - 4 : start + SLOT] == b"back"
        finally:
            other.close()
        # Sealed: a holder of the fd cannot shrink the memory under the daemon's mapping.
        with pytest.raises(PermissionError):
            os.ftruncate(ring.fd, 0)
        ring.release(slot)
    finally:
        fd = ring.fd
        ring.close()
        api.close()
    assert ring.fd == -1
    with contextlib.suppress(FileNotFoundError):  # the number may be reused since: not by it
        assert not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:tensorferry-ring")


def test_the_first_touch_runs_on_the_nodes_cpus(tmp_path: Path) -> None:
    assert numa.parse_cpulist("0-2,8,10-11\n") == {0, 1, 2, 8, 10, 11}
    assert numa.parse_cpulist("\n") == frozenset()
    mine = frozenset(os.sched_getaffinity(0))
    cpu = min(mine)
    (tmp_path / "node3").mkdir()
    (tmp_path / "node3" / "cpulist").write_text(f"{cpu},100000\n")
    assert numa.node_cpus(3, tmp_path) == {cpu}  # only those this process may use
    assert numa.node_cpus(4, tmp_path) == frozenset()
    assert numa.on_cpus(frozenset({cpu}), lambda: os.sched_getaffinity(0)) == {cpu}
    assert os.sched_getaffinity(0) == mine  # the caller's thread is left as it was
    with pytest.raises(ZeroDivisionError):
        numa.on_cpus(frozenset({cpu}), lambda: 1 // 0)


def node_tree(root: Path, cpulists: dict[int, str]) -> Path:
    for node, cpus in cpulists.items():
        (root / f"node{node}").mkdir(parents=True)
        (root / f"node{node}" / "cpulist").write_text(cpus + "\n")
    return root


def two_cpus() -> tuple[int, int]:
    """Two CPUs this process may run on (the same one twice on a one-CPU runner)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


@contextlib.asynccontextmanager
async def two_node_runtime(
    root: Path, nodes: tuple[int, int] = (0, 1), slots: int = 4
) -> AsyncIterator[CudaRuntime]:
    settings = CudaSettings(
        api="fake", ring_slots=slots, slot_size=SLOT, copy_streams=2, reserve=0,
        fake_devices=(FakeDevice(GPU_A, MEMORY, numa_node=nodes[0]),
                      FakeDevice(GPU_B, MEMORY, numa_node=nodes[1])),
    )  # fmt: skip
    async with open_cuda(settings, chunk_size=SLOT, instance="test", node_root=root) as cuda:
        assert cuda is not None
        yield cuda


async def test_gpus_on_two_numa_nodes_get_a_ring_each_and_a_load_uses_its_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_cpus()
    root = node_tree(tmp_path / "node", {0: str(first), 1: str(second)})
    touched: list[tuple[frozenset[int], set[int]]] = []
    on_cpus = numa.on_cpus

    def recording(cpus: frozenset[int], fn: Callable[[], T]) -> T:
        def run() -> T:
            touched.append((cpus, os.sched_getaffinity(0)))
            return fn()

        return on_cpus(cpus, run)

    monkeypatch.setattr(numa, "on_cpus", recording)
    store, plan, uri = await model(tmp_path / "m")
    async with two_node_runtime(root) as cuda:
        rings = cuda.rings
        assert [(r.node, r.slots, r.first) for r in rings] == [(0, 4, 0), (1, 4, 4)]
        assert touched == []  # pinned at the first load onto their GPUs, not at start
        await cuda.open_devices(cuda.devices)
        assert touched == [(frozenset({first}), {first}), (frozenset({second}), {second})]
        a, b = cuda.devices
        assert (rings.ring_of(a).node, rings.ring_of(b).node) == (0, 1)
        assert [(s.numa_node, list(s.gpu_uuids), s.slots) for s in cuda.ring_status()] == [
            (0, [GPU_A], 4), (1, [GPU_B], 4),
        ]  # fmt: skip
        got = await load_plan_cuda(
            store, plan, uri, cuda, [b], concurrency=8, on_plan=lambda p: None,
            progress=lambda n: None,
        )  # fmt: skip
        # Every range of a load onto GPU B went through node 1's ring, none through node 0's.
        assert (rings.rings[0].taken, rings.rings[1].taken) == (0, store.reads)
        assert store.reads == len(got.plan.ranges) > 4
        want = expected(tmp_path / "m")
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        (arena,) = got.arenas
        for t in got.plan.tensors:
            assert fake.read(arena.ptr + t.offset, t.nbytes) == want[t.name], t.name
        cuda.sink.release(arena)
        await until(lambda: rings.free == rings.slots == 8)


async def test_one_ring_when_the_nodes_cannot_be_used(tmp_path: Path) -> None:
    first, _ = two_cpus()
    # Node 1's only CPU is one this process may not run on: no memory can be placed there.
    root = node_tree(tmp_path / "node", {0: str(first), 1: "100000"})
    async with two_node_runtime(root) as cuda:
        assert [(r.node, r.slots) for r in cuda.rings] == [(-1, 4)]
        assert cuda.rings.layout == (
            "one ring: this process may not run on NUMA node 1's CPUs, so it cannot place "
            "memory there"
        )
    api = FakeCudaApi([FakeDevice(GPU_A, numa_node=0), FakeDevice(GPU_B)])
    try:
        groups, why = numa_groups(api, api.devices(), root)
        assert [(g.node, len(g.devices)) for g in groups] == [(-1, 2)]
        assert why == "one ring: the NUMA node of cuda:1 is unknown"
        both = FakeCudaApi([FakeDevice(GPU_A, numa_node=0), FakeDevice(GPU_B, numa_node=0)])
        groups, why = numa_groups(both, both.devices(), root)
        assert [(g.node, g.cpus, len(g.devices)) for g in groups] == [(0, frozenset({first}), 2)]
        assert why == "all GPUs on NUMA node 0"
        far = FakeCudaApi([FakeDevice(GPU_A, numa_node=1)])
        groups, why = numa_groups(far, far.devices(), root)
        assert [(g.node, g.cpus) for g in groups] == [(-1, frozenset())]
        assert why == "all GPUs on NUMA node 1, whose CPUs this process may not run on"
        far.close()
        both.close()
    finally:
        api.close()


def test_status_and_the_cli_show_the_rings(local_root: Path) -> None:
    config = f"""
[cuda]
api = "fake"
slot_size = "64KiB"
reserve = 0
[[cuda.fake_devices]]
uuid = "{GPU_A}"
memory = "64MiB"
numa_node = 0
"""
    # 100 Gb/s: 143 slots; of 64 KiB here, so that the test pins 9 MiB, not 1.1 GiB.
    with running_daemon(
        daemon_env(None), allow=[str(local_root)], extra_config=config,
        s3_config="target_rate = 12500000000",
    ) as d:  # fmt: skip
        with d.client() as client:
            (ring,) = client.status().rings
        # Not pinned before a load onto its GPU asks for it.
        assert (ring.slots, ring.slot_bytes, ring.free_slots, ring.pinned) == (143, SLOT, 0, False)
        assert list(ring.gpu_uuids) == [GPU_A]
        # This host's node 0 (if sysfs has one) or none: both are one ring.
        assert ring.numa_node in (0, -1)
        assert ring.sizing.startswith(
            "auto: 139 GETs in flight for 100 Gb/s ([s3] target_rate) at 90 MB/s each + 4 "
            "for the copy streams; "
        )
        out = subprocess.run(
            [sys.executable, "-m", "tensorferry", "status", "--socket", str(d.socket)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        assert (
            f"143 slots x 0.0625 MiB = 0.01 GiB, pinned at the first load onto its GPUs; "
            f"{ring.sizing}"
        ) in out
        assert "pinned rings: 1 x 143 slots of 65536 bytes, 8 MiB pinned" in d.output()
