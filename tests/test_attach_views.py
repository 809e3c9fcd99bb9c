"""The worker's side of an attach with no daemon: views over an arena, and what a CPU
attach imports."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import torch

from tensorferry.client._views import DTYPES, build_views
from tensorferry.errors import InvalidArtifact
from tensorferry.v1 import tensorferry_pb2 as pb

NAMES = {dtype: name for name, dtype in DTYPES.items()}


def arena(
    tensors: dict[str, torch.Tensor], align: int = 8
) -> tuple[torch.Tensor, list[pb.TensorInfo]]:
    """The tensors laid out as the daemon lays them: each at a multiple of ``align`` bytes."""
    table, chunks, cursor = [], [], 0
    for name, t in tensors.items():
        data = raw(t)
        pad = -cursor % align
        chunks.append(torch.zeros(pad, dtype=torch.uint8))
        cursor += pad
        info = pb.TensorInfo(name=name, dtype=NAMES[t.dtype], shape=t.shape, offset=cursor,
                             nbytes=data.numel())  # fmt: skip
        table.append(info)
        chunks.append(data)
        cursor += data.numel()
    chunks.append(torch.zeros(-cursor % align, dtype=torch.uint8))
    return torch.cat(chunks), table


def mixed() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(1, 2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "f8": torch.randn(4, 2, generator=gen).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "f32b": torch.randn(2, 2, generator=gen),
    }


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_views(views: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(views) == list(want)
    for name, t in want.items():
        assert views[name].dtype == t.dtype, name
        assert views[name].shape == t.shape, name
        assert views[name].is_contiguous(), name
        assert torch.equal(raw(views[name]), raw(t)), name


def test_views_hold_each_tensor_and_share_the_arena() -> None:
    want = mixed()
    flat, table = arena(want)
    views = build_views(flat, table)
    assert_views(views, want)
    flat[table[0].offset] ^= 0xFF  # a zero-copy view sees the arena change
    assert not torch.equal(raw(views["f32"]), raw(want["f32"]))


def test_views_of_an_arena_that_starts_inside_its_storage() -> None:
    """as_strided counts its offset from the storage's start: a flat tensor that does not
    start there (a GPU import may not) still gives each tensor its own bytes."""
    want = mixed()
    flat, table = arena(want)
    shifted = torch.cat([torch.full((64,), 0xAB, dtype=torch.uint8), flat])[64:]
    assert shifted.storage_offset() == 64
    assert_views(build_views(shifted, table), want)


def test_an_arena_of_an_odd_size_takes_the_slice_path() -> None:
    want = {"i16": torch.arange(3, dtype=torch.int16), "u8": torch.arange(3, dtype=torch.uint8)}
    flat, table = arena(want, align=2)
    flat = flat[:-1]  # 9 bytes: not a whole number of int16
    assert flat.numel() % 2 == 1
    assert_views(build_views(flat, table), want)


def info(**fields: Any) -> pb.TensorInfo:
    base: dict[str, Any] = {"name": "w", "dtype": "F32", "shape": [2, 2], "offset": 0,
                               "nbytes": 16}  # fmt: skip
    return pb.TensorInfo(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offset": 12}, "tensor 'w' lies outside its arena"),
        ({"dtype": "F4"}, "tensor 'w' has dtype 'F4', unknown to this client"),
        ({"nbytes": 12, "shape": [2, 2]},
         "tensor 'w' has shape [2, 2] of F32, 16 bytes, but the daemon gave it 12"),
        ({"nbytes": 20, "shape": [2, 2], "offset": 0},
         "tensor 'w' has shape [2, 2] of F32, 16 bytes, but the daemon gave it 20"),
        ({"offset": 2, "nbytes": 4, "shape": [1]},
         "tensor 'w' starts at byte 2 of its arena, not a multiple of its F32 element size (4)"),
    ],
    ids=["outside", "dtype", "short", "long", "misaligned"],
)  # fmt: skip
def test_a_table_entry_that_does_not_fit_is_refused(
    fields: dict[str, object], message: str
) -> None:
    flat = torch.zeros(24, dtype=torch.uint8)
    with pytest.raises(InvalidArtifact) as err:
        build_views(flat, [info(**fields)])
    assert str(err.value) == message


CPU_ATTACH = """
import mmap, os, sys
from tensorferry.client._model import map_or_end
from tensorferry.v1 import tensorferry_pb2 as pb
ended = []
grant = pb.Ready(cpu_shm=pb.CpuShmGrant(name=sys.argv[1], size=4096))
flat = map_or_end(grant, None, lambda: ended.append(1))
assert int(flat[7]) == 7, int(flat[7])
del flat
assert ended == [1], ended
print([m in sys.modules for m in ("tensorferry.client._cuda", "tensorferry.cuda")])
"""


def test_a_cpu_attach_never_imports_the_cuda_side() -> None:
    """The CUDA module cost 5 ms of a 20 ms attach in a fresh worker; a CPU grant needs none."""
    name = f"tensorferry-test-{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 16)
    try:
        out = subprocess.run(
            [sys.executable, "-c", CPU_ATTACH, name], capture_output=True, text=True,
            timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"},
        )  # fmt: skip
    finally:
        os.unlink(path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False, False]"


@pytest.mark.parametrize("kind", ["cpu_shm", "cuda_ipc"])
def test_a_failed_mapping_ends_the_lease_unless_a_gpu_mapping_may_still_be_open(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from tensorferry.client import _model, _views
    from tensorferry.client._cuda import MappingStillOpen

    def still_open(*args: object) -> torch.Tensor:
        raise MappingStillOpen("the mapping may still be open")

    def refused(*args: object) -> torch.Tensor:
        raise InvalidArtifact("refused")

    grant = pb.Ready(**{kind: {}})  # type: ignore[arg-type]
    # (Only a GPU mapping raises MappingStillOpen.)
    cases = [(refused, False)] + ([(still_open, True)] if kind == "cuda_ipc" else [])
    for fail, kept in cases:
        monkeypatch.setattr(_views, "map_grant", fail)
        ended: list[int] = []
        with pytest.raises((MappingStillOpen, InvalidArtifact)):
            _model.map_or_end(grant, None, functools.partial(ended.append, 1))
        assert ended == ([] if kept else [1]), fail.__name__
