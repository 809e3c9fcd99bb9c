"""What the `tensorferry prepare` tests share: a shard plan and a model it splits, the
daemon they load through, and ways to run prepare and count what a load fetched."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tensorferry.devtools.modelgen import random_tensor
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tensorferry.format.manifest import MANIFEST_NAME, Manifest
from tensorferry.prepare import prepare
from tensorferry.prepare.run import Options
from tests.conftest import BUCKET, running_daemon

ALIGN = 4096
SHARD_PLAN = """
version = 1
[[shard]]
match = "*.qkv_proj.*"
split = "column"
fused = [128, 64, 64]
[[shard]]
match = "*.gate_up_proj.weight"
split = "column"
fused = [96, 96]
[[shard]]
match = ["*.o_proj.weight", "*.down_proj.weight"]
split = "row"
[[shard]]
match = "*.experts.weight"
dim = -2
[[shard]]
match = "*.post_norm.weight"
split = "none"
[[shard]]
match = "model.embed_tokens.weight"
split = "column"
"""
# name -> (dim, parts) as the plan above splits it; anything else is replicated.
SPLITS = {
    "layers.0.self_attn.qkv_proj.weight": (0, [128, 64, 64]),
    "layers.0.self_attn.qkv_proj.bias": (0, [128, 64, 64]),
    "layers.0.mlp.gate_up_proj.weight": (0, [96, 96]),
    "layers.0.self_attn.o_proj.weight": (1, [128]),
    "layers.0.mlp.down_proj.weight": (1, [96]),
    "layers.0.experts.weight": (1, [6]),
    "model.embed_tokens.weight": (0, [10]),
}


def prepare_env(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One counting proxy and one daemon behind it (a test module's ``env`` fixture)."""
    local = tmp_path_factory.mktemp("prepared")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TENSORFERRY_"))}
    with CountingProxy(s3.endpoint) as proxy:
        daemon_env = {
            **base,
            **s3.env(),
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        allow = [f"s3://{BUCKET}/", str(local)]
        with running_daemon(daemon_env, allow=allow, s3_config='chunk_size = "256KiB"') as d:
            yield {"proxy": proxy, "daemon": d, "local": local}


def use_s3_directly(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process prepare talks to SeaweedFS directly."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)


def run_prepare(src: str, dst: str, **kwargs: Any) -> Manifest:
    return asyncio.run(prepare(Options(src=src, dst=dst, **kwargs))).manifest


def data_bytes(proxy: CountingProxy, manifest_size: int) -> int:
    # Ranges that start at byte 0 and end below 1 MiB count as header GETs, the manifest too.
    body = proxy.stats().body_bytes
    return body[Kind.DATA_GET] + body[Kind.HEADER_GET] - manifest_size


def read_manifest(s3: S3Server, prefix: str) -> bytes:
    body = s3.client().get_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME)["Body"]
    return bytes(body.read())


def sharded_model(directory: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)

    def t(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return random_tensor(shape, dtype, gen)

    first = {
        "model.embed_tokens.weight": t((10, 256), torch.bfloat16),  # TP=4: 3, 3, 2, 2 rows
        "layers.0.input_layernorm.weight": t((256,), torch.float32),  # no rule: replicated
        "layers.0.self_attn.qkv_proj.weight": t((256, 256), torch.float16),  # fused Q, K, V
        "layers.0.self_attn.qkv_proj.bias": t((256,), torch.float16),
        "layers.0.self_attn.o_proj.weight": t((256, 128), torch.float32),  # row parallel
    }
    second = {
        "layers.0.mlp.gate_up_proj.weight": t((192, 256), torch.bfloat16),  # fused gate, up
        "layers.0.mlp.down_proj.weight": t((256, 96), torch.float8_e4m3fn),
        "layers.0.experts.weight": t((4, 6, 64), torch.int8),  # dim 1, TP=4: 2, 2, 1, 1
        "layers.0.post_norm.weight": t((256,), torch.bfloat16),
    }
    directory.mkdir(parents=True)
    save_file(first, str(directory / "model-00001-of-00002.safetensors"))
    save_file(second, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return first | second


def shard_of(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if name not in SPLITS:
        return full
    dim, parts = SPLITS[name]
    raw = full.view(torch.uint8) if full.dtype == torch.float8_e4m3fn else full
    pieces = [torch.tensor_split(p, world, dim)[rank] for p in torch.split(raw, parts, dim)]
    return torch.cat(pieces, dim).contiguous().view(full.dtype)
