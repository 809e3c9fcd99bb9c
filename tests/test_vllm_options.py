"""The vLLM loader's parts that need no vLLM: options, pipeline stages, error texts (#16)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tensorferry.errors import InvalidArtifact, InvalidRequest, SourceNotAllowed
from tensorferry.integrations.vllm_options import (
    LoaderOptions,
    Weights,
    loaded_line,
    missing_error,
    stage_selection,
)


def test_options_take_the_documented_keys() -> None:
    o = LoaderOptions.parse(
        {"uri": "s3://b/m/", "device": "cuda", "select": "model.*", "timeout": 30,
         "client_name": "rank 0"}
    )  # fmt: skip
    assert o == LoaderOptions("s3://b/m/", "cuda", ("model.*",), 30.0, "rank 0")
    assert LoaderOptions.parse(None).source("/srv/llama") == "/srv/llama"
    assert o.source("/srv/llama") == "s3://b/m/"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"uri": "s3://b/m/", "socket": "/x", "bogus": 1},
         "--model-loader-extra-config for --load-format tensorferry has unknown key(s) bogus, "
         "socket; accepted: uri, device, select, timeout, client_name, keep_gpu_copy"),
        ({"device": "cuda:1"},
         "tensorferry loader: device must be \"cpu\" or \"cuda\", not 'cuda:1'"),
        ({"timeout": -1},
         "tensorferry loader: timeout must be a positive number of seconds, not -1"),
        ({"timeout": True},
         "tensorferry loader: timeout must be a positive number of seconds, not True"),
        ({"select": [1]}, "tensorferry loader: select must be a list of tensor patterns"),
        ({"uri": 3}, "tensorferry loader: uri and client_name must be strings"),
    ],
)  # fmt: skip
def test_bad_options_say_what_is_accepted(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        LoaderOptions.parse(extra)
    assert info.value.message == message


def test_a_pipeline_stage_selects_its_layers_and_everything_outside_the_layers() -> None:
    names = [
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        *(f"model.layers.{i}.{p}" for i in range(4)
          for p in ("mlp.up_proj.weight", "input_layernorm.weight")),
    ]  # fmt: skip
    index = json.dumps({"weight_map": dict.fromkeys(names, "x.safetensors")}).encode()
    assert stage_selection(index, [2, 3]) == (
        "lm_head.weight", "model.embed_tokens.weight",
        "model.layers.2.input_layernorm.weight", "model.layers.2.mlp.up_proj.weight",
        "model.layers.3.input_layernorm.weight", "model.layers.3.mlp.up_proj.weight",
        "model.norm.weight",
    )  # fmt: skip


def test_weights_name_the_tensor_vllm_refused_and_pass_our_errors_through() -> None:
    pairs = [("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(4))]
    weights = Weights(pairs)
    it = iter(weights)
    next(it)
    err = weights.mismatch(
        "s3://b/m/", AssertionError("Attempted to load weight (2, 3) into (2, 4)")
    )
    assert str(err) == (
        "s3://b/m/: tensor a (shape [2, 3], torch.bfloat16) does not fit the model vLLM built "
        "from its config: Attempted to load weight (2, 3) into (2, 4); the checkpoint and "
        "config.json must describe the same model"
    )
    assert isinstance(err, InvalidArtifact)
    ours = SourceNotAllowed("not allowed")
    assert weights.mismatch("s3://b/m/", ours) is ours
    assert list(it) == [pairs[1]]
    assert (weights.count, weights.bytes, weights.names) == (2, 12 + 16, {"a", "b"})


def test_missing_tensors_are_named_up_to_eight() -> None:
    err = missing_error("s3://b/m/", [f"t{i}" for i in range(10)])
    assert str(err) == (
        "s3://b/m/ lacks tensors the model needs: t0, t1, t2, t3, t4, t5, t6, t7 and 2 more; "
        "the checkpoint and config.json must describe the same model (or widen the loader's "
        "select)"
    )


def test_the_load_line_splits_the_time_without_counting_the_first_wait_twice() -> None:
    # A fake clock: 12 s before the first tensor, then 1 s waiting and 2 s of vLLM's copying
    # for each of 3 tensors; the end of the stream takes 1 s more.
    now = [100.0]
    steps = iter([12.0, 1.0, 1.0, 1.0])

    def pairs() -> Iterator[tuple[str, torch.Tensor]]:
        for name in ("a", "b", "c"):
            now[0] += next(steps)
            yield name, torch.zeros(4)
        now[0] += next(steps)

    weights = Weights(pairs(), clock=lambda: now[0])
    for _ in weights:
        now[0] += 2.0
    # First tensor at 12 s; then 2 s of waiting between tensors, 1 s for the end, 6 s copying.
    assert weights.waited == 3.0
    assert loaded_line(weights, "s3://b/m/", since=100.0, attached=False) == (
        "tensorferry: 3 tensors (0.000 GB) from s3://b/m/ into the model in 21.00 s (streamed "
        "as they landed; first tensor at 12.00 s, 3.00 s waiting for tensors, 6.00 s copying)"
    )
