"""`prepare` puts large tensors on the chunk grid, filling the gaps with small ones held back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import crc32c
import torch
from safetensors.torch import load_file, save_file

from tensorferry.daemon.planner import align_up
from tensorferry.prepare import prepare
from tensorferry.prepare.run import Options

CHUNK = 64 << 10


def test_large_tensors_start_on_the_chunk_grid_and_every_byte_is_in_place(
    tmp_path: Path,
) -> None:
    # Source order interleaves small and large tensors of sizes that are and are not whole
    # chunks, as norms and projections do in a checkpoint.
    gen = torch.Generator().manual_seed(7)
    sizes = [3000, 2 * CHUNK, 512, 2 * CHUNK + 20000, 100, 4096, CHUNK, 777, 3 * CHUNK + 4]
    tensors = {
        f"t{i:02d}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=gen)
        for i, n in enumerate(sizes)
    }
    (tmp_path / "src").mkdir()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    result = asyncio.run(
        prepare(Options(src=str(tmp_path / "src"), dst=str(tmp_path / "out"), chunk_size=CHUNK))
    )
    m = result.manifest
    data = (tmp_path / "out" / m.objects[0].name).read_bytes()
    assert len(data) == m.objects[0].size
    want = load_file(tmp_path / "src" / "model.safetensors")
    end, on_grid = 0, []
    for t in sorted(m.tensors, key=lambda t: t.slices[0].offset):
        (s,) = t.slices
        assert s.offset >= end, t.name  # no overlap
        if s.nbytes >= CHUNK:
            # On the grid, unless the gap left to it would cost over 1/16 of the tensor.
            gap = -align_up(end) % CHUNK
            assert s.offset % CHUNK == 0 or gap > s.nbytes // 16, (t.name, s.offset, gap)
            on_grid += [t.name] if s.offset % CHUNK == 0 else []
        got = data[s.offset : s.offset + s.nbytes]
        assert got == want[t.name].numpy().tobytes(), t.name
        chunks = [got[i : i + CHUNK] for i in range(0, s.nbytes, CHUNK)]
        assert list(s.crc) == [crc32c.crc32c(c) for c in chunks], t.name
        end = s.offset + s.nbytes
    # t00 is held back so that t01 starts the object; t01 ends on the grid, t03 follows it.
    assert on_grid == ["t01", "t03"]
    # The small tensors filled the gaps: the padding is what a 4 KiB-aligned layout would
    # need plus at most 1/16 of each large tensor.
    assert m.objects[0].size - sum(sizes) <= len(sizes) * 4096 + sum(sizes) // 16
