"""Generated safetensors models for the demo, tests and benchmarks.

Random bytes (not random numbers) fill every tensor: compare loads by bytes, since a
random bit pattern may be a NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Every dtype in safetensors' torch table.
ALL_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64, "U64": torch.uint64,
    "U32": torch.uint32, "U16": torch.uint16,
}  # fmt: skip

MIXED = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.float8_e4m3fn]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def write_model(
    directory: Path, total_bytes: int, *, shards: int = 1, seed: int = 0,
    dtypes: list[torch.dtype] | None = None, layer_bytes: int = 16 << 20,
) -> list[Path]:  # fmt: skip
    """A transformer-like model of about ``total_bytes`` in ``shards`` files (+ index)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or MIXED
    per_shard = max(total_bytes // shards, 1)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    index = 0
    for s in range(shards):
        name = (
            "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        )
        tensors: dict[str, torch.Tensor] = {}
        size = 0
        while size < per_shard:
            dtype = dtypes[index % len(dtypes)]
            itemsize = torch.empty((), dtype=dtype).element_size()
            cols = 1024
            rows = max(1, min(layer_bytes, per_shard - size) // (cols * itemsize))
            t = random_tensor((rows, cols), dtype, gen)
            key = f"layers.{index}.weight"
            tensors[key] = t
            tensors[f"layers.{index}.bias"] = random_tensor((cols,), dtype, gen)
            size += t.nbytes + cols * itemsize
            index += 1
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        files.append(directory / name)
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
        )
    (directory / "config.json").write_text(json.dumps({"model_type": "generated", "seed": seed}))
    return files


def write_all_dtypes(directory: Path, *, seed: int = 1) -> Path:
    """One file with every dtype, plus 0-d and zero-element tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype in ALL_DTYPES.items():
        tensors[f"{name}.matrix"] = random_tensor((3, 5), dtype, gen)
        tensors[f"{name}.scalar"] = random_tensor((), dtype, gen)
        tensors[f"{name}.empty"] = random_tensor((0, 4), dtype, gen)
    path = directory / "model.safetensors"
    save_file(tensors, str(path))
    return path
