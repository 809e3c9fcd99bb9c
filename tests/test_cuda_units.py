"""Units of the CUDA path that need no device at all: GPU layout, device names, config."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tensorferry.cuda import DeviceInfo, cuda_ordinals, normalize_pci
from tensorferry.daemon.config.settings import ConfigError, load_settings
from tensorferry.daemon.devices import check_device, resolve_devices
from tensorferry.daemon.gpu.layout import GPU_ALIGN, Piece, gpu_layout, place_tensors
from tensorferry.daemon.planner import Plan, PlannedTensor, Range
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.errors import FailedPrecondition, InvalidRequest

OBJ = ObjectInfo("model.safetensors", 1 << 30, "etag")
GPUS = [
    DeviceInfo(0, "GPU-aaaaaaaa-0000-4000-8000-000000000001", "0000:3b:00.0"),
    DeviceInfo(1, "GPU-bbbbbbbb-0000-4000-8000-000000000002", "0000:86:00.0"),
]


def packed(sizes: list[int], chunk: int) -> Plan:
    """Tensors back to back from offset 0, as a safetensors data section has them."""
    tensors, offset = [], 0
    for i, n in enumerate(sizes):
        tensors.append(PlannedTensor(f"t{i}", "U8", (n,), offset, n))
        offset += n
    ranges = tuple(Range(OBJ, 100 + p, min(chunk, offset - p), p) for p in range(0, offset, chunk))
    return Plan(tuple(tensors), ranges, offset)


def test_packed_tensors_land_aligned_and_every_byte_is_copied_once() -> None:
    plan = packed([6, 1000, 4096, 3, 70_000, 0, 256], chunk=4096)
    gpu, jobs = gpu_layout(plan, slot_size=4096)
    for t in gpu.tensors:
        assert t.offset % GPU_ALIGN == 0, t
    spans = sorted((t.offset, t.offset + t.nbytes) for t in gpu.tensors if t.nbytes)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    # Replay the copies: every tensor's GPU bytes are its staging bytes.
    staging = bytes(i % 251 for i in range(plan.arena_size))
    arena = bytearray(gpu.arena_size)
    for job in jobs:
        r = job.range
        slot = staging[r.arena_offset : r.arena_offset + r.length]
        for p in job.pieces:
            arena[p.dst : p.dst + p.nbytes] = slot[p.src : p.src + p.nbytes]
    by_name = {t.name: t for t in plan.tensors}
    for t in gpu.tensors:
        src = by_name[t.name]
        assert arena[t.offset : t.offset + t.nbytes] == staging[src.offset : src.offset + t.nbytes]
    assert gpu.arena_size == 2 << 20  # rounded to the allocation granularity


def test_an_aligned_plan_keeps_its_layout_and_copies_one_piece_per_slot() -> None:
    plan = packed([4096, 512, 8192, 256], chunk=4096)
    gpu, jobs = gpu_layout(plan, slot_size=4096)
    assert [t.offset for t in gpu.tensors] == [t.offset for t in plan.tensors]
    assert [j.pieces for j in jobs] == [(Piece(0, 4096 * i, 4096),) for i in range(3)] + [
        (Piece(0, 12288, 768),)
    ]


def test_place_tensors_keeps_a_displacement_only_while_it_stays_aligned() -> None:
    ts = tuple(PlannedTensor(f"t{i}", "U8", (n,), o, n) for i, (o, n) in enumerate(
        [(4096, 256), (4352, 10), (4362, 512), (4874, 30)]
    ))  # fmt: skip
    assert place_tensors(ts) == {"t0": 0, "t1": 256, "t2": 512, "t3": 1024}


def test_ranges_larger_than_a_slot_split_between_their_checksummed_chunks() -> None:
    checks = ((0, 40_000, 1), (40_000, 40_000, 2), (81_920, 10_000, 3))  # a gap before the last
    r = Range(OBJ, 1000, 91_920, 8192, checks)
    plan = Plan((PlannedTensor("w", "U8", (91_920,), 8192, 91_920),), (r,), 100_000)
    _, jobs = gpu_layout(plan, slot_size=64 << 10)
    assert [(j.range.start, j.range.length, j.range.checks) for j in jobs] == [
        (1000, 40_000, ((0, 40_000, 1),)),
        (41_000, 51_920, ((0, 40_000, 2), (41_920, 10_000, 3))),
    ]
    with pytest.raises(FailedPrecondition) as info:
        gpu_layout(plan, slot_size=32 << 10)
    assert info.value.message == (
        "model.safetensors: its checksummed chunks have 40000 bytes, more than a ring slot "
        "(32768 bytes); raise [cuda] slot_size to at least 40000"
    )


def test_device_strings_and_their_messages() -> None:
    assert check_device("") == "cpu"
    with pytest.raises(FailedPrecondition) as no_gpu:
        check_device("cuda:0")
    assert no_gpu.value.message == (
        "device 'cuda:0': no CUDA device is visible to the daemon; load with device='cpu' or "
        "run the daemon on a GPU host"
    )
    with pytest.raises(InvalidRequest) as bad:
        check_device("gpu0")
    assert bad.value.message == "device 'gpu0' is not supported: use 'cpu' or 'cuda:N'"
    a, b = GPUS[0].uuid, GPUS[1].uuid
    assert resolve_devices("cuda:1", (), GPUS, lease=True) == [b]
    assert resolve_devices("cuda", (), GPUS, lease=True) == [a]
    assert resolve_devices("cuda:0", (b.upper(),), GPUS, lease=True) == [b]  # the worker's 0
    assert resolve_devices("cuda:0,cuda:1", (), GPUS, lease=False) == [a, b]
    with pytest.raises(FailedPrecondition) as beyond:
        resolve_devices("cuda:2", (), GPUS, lease=True)
    assert beyond.value.message == (
        f"device 'cuda:2': the daemon sees 2 CUDA devices ({a} (its cuda:0), {b} (its "
        "cuda:1)); the client library sends the GPU's UUID, a raw request numbers GPUs as the "
        "daemon does"
    )
    with pytest.raises(InvalidRequest) as twice:
        resolve_devices("cuda:0,cuda:0", (), GPUS, lease=False)
    assert twice.value.message == "device 'cuda:0,cuda:0' names one GPU twice"
    with pytest.raises(InvalidRequest) as count:
        resolve_devices("cuda:0", (a, b), GPUS, lease=True)
    assert count.value.message == (
        "device 'cuda:0' names 1 GPUs but the request carries 2 GPU UUIDs"
    )
    assert cuda_ordinals("cuda:1, cuda:12") == [1, 12]
    assert cuda_ordinals("cuda:x") is None
    assert normalize_pci("00000000:3B:00.0") == "0000:3b:00.0"


def test_cuda_config_is_validated_with_the_key_named(tmp_path: Path) -> None:
    config = tmp_path / "tf.toml"
    config.write_text(
        '[cuda]\napi = "fake"\nring_slots = 8\nslot_size = "1MiB"\n'
        '[[cuda.fake_devices]]\nuuid = "GPU-aaaaaaaa-0000-4000-8000-000000000001"\n'
        'memory = "2GiB"\n'
    )
    cuda = load_settings(config).cuda
    assert (cuda.api, cuda.ring_slots, cuda.slot_size) == ("fake", 8, 1 << 20)
    assert cuda.fake_devices[0].memory == 2 << 30
    for body, message in [
        ('api = "rocm"', "cuda.api: must be one of auto, cupy, fake, off, got 'rocm'"),
        ("ring_slots = 1", "cuda.ring_slots: must be 2..4096, got 1"),
        ('api = "fake"', 'cuda.fake_devices: api = "fake" needs at least one device'),
        ('[[cuda.fake_devices]]\nuuid = "gpu0"',
         "cuda.fake_devices: 'gpu0' is not a GPU UUID (GPU-xxxxxxxx-xxxx-...)"),
    ]:  # fmt: skip
        config.write_text(f"[cuda]\n{body}\n")
        with pytest.raises(ConfigError) as info:
            load_settings(config)
        assert str(info.value) == message


def test_cupy_without_a_driver_means_no_cuda(caplog: pytest.LogCaptureFixture) -> None:
    """CI installs cupy-cuda12x on a machine without a driver: the real API imports, finds
    the driver missing, and the daemon serves CPU only (cuda:N is FAILED_PRECONDITION, see
    test_cuda_e2e) instead of crashing."""
    pytest.importorskip("cupy")
    import logging

    from tensorferry.cuda.cupy_api import CupyCudaApi

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    with caplog.at_level(logging.INFO, logger="tensorferry.cuda.cupy_api"):
        assert CupyCudaApi.create_or_none() is None
    assert "no usable CUDA through cupy: CudaError: cudaErrorInsufficientDriver" in (caplog.text)
