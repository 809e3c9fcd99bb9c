"""vLLM's ``--load-format tensorferry``: weights from the tensorferry daemon, streamed.

    vllm serve DIR --load-format tensorferry \\
        --model-loader-extra-config '{"uri": "s3://models/llama/"}'

DIR holds config.json and the tokenizer (``tensorferry files URI DIR`` writes them from
the daemon). Installing tensorferry registers the loader with vLLM (entry point group
``vllm.general_plugins``, see ``vllm_plugin``); this module imports vLLM and is imported
only by vLLM's plugin loader, never by tensorferry itself.

In the CPU arena (the default) every rank of every engine on the host asks the daemon
for the same model: one fetch, one resident copy; each rank's own weight loaders take its
slice. On a GPU (``"device": "cuda"``) each rank asks for its own share of an artifact
prepared per rank (``vllm_load.placement``); plain safetensors are refused there. The
tensors come as they land (``Client.stream``): vLLM copies each into its parameters while
the daemon is still fetching the rest, so loading takes about as long as the fetch. After
the copy the rank drops its views, which ends its lease; a CPU arena stays resident for
the next engine, a GPU copy is evicted (``keep_gpu_copy`` keeps it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, cast

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from tensorferry.client import Client
from tensorferry.integrations.vllm_load import feed, placement
from tensorferry.integrations.vllm_options import (
    INDEX_FILE,
    LoaderOptions,
    loaded_line,
    missing_error,
    stage_selection,
)
from tensorferry.integrations.vllm_shares import rank_shares

# A child of vLLM's logger: these lines appear in vLLM's output, in its format.
log = logging.getLogger("vllm.tensorferry")


class TensorferryModelLoader(BaseModelLoader):
    """``BaseModelLoader`` over the daemon; options: `LoaderOptions`."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)

    def get_external_weight_memory(self, vllm_config: VllmConfig) -> int:
        # Copy mode: the engine's parameters hold their own copy, and the daemon's arena
        # is not this engine's memory (it is freed or kept by the daemon's own budget).
        return 0

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: the daemon fetches (``tensorferry preload`` warms it)."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        uri = self.options.source(model_config.model)
        rank, tp_size, stage_layers = _parallel_position(model)
        where = placement(self.options.device, _gpu(self.options.device), rank, tp_size)
        name = self.options.client_name or f"vllm pid {os.getpid()} rank {rank}"
        t0 = time.monotonic()
        shares = rank_shares(model) if where.world_size else contextlib.nullcontext()
        with Client() as client, shares:
            select = self.options.select or _stage_select(client, uri, stage_layers)
            # vLLM models define load_weights; nn.Module does not declare it.
            fed = feed(
                client, uri, where, self.options, name=name, select=select,
                load=cast(Any, model).load_weights,
            )  # fmt: skip
        if fed.loaded is not None and model_config.quantization is None:
            missing = _expected(model) - fed.loaded
            if missing:
                raise missing_error(uri, missing)
        log.info("%s", loaded_line(fed.weights, uri, since=t0, attached=fed.attached))
        if fed.released:
            log.info("tensorferry: evicted the daemon's copy on %s after the copy", where.device)


def _gpu(option: str) -> str:
    """This rank's GPU: torch's current device (vLLM sets it per worker); without CUDA in
    torch, "cuda", which the client's CUDA API resolves (the fake one in tests)."""
    if option == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cuda"


def _parallel_position(model: nn.Module) -> tuple[int, int, list[int] | None]:
    """This worker's tensor-parallel rank and size, and its pipeline stage's layers (None:
    one stage)."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    if get_pp_group().world_size <= 1:
        return rank, size, None
    layers = sorted(
        {
            int(part.split(".")[0])
            for name, p in model.named_parameters()
            if ".layers." in name and not p.is_meta
            for part in [name.split(".layers.", 1)[1]]
        }
    )
    return rank, size, layers


def _stage_select(client: Client, uri: str, layers: list[int] | None) -> tuple[str, ...]:
    """A pipeline stage fetches its own layers when the checkpoint has an index to say
    which tensors those are; otherwise every stage takes the whole model."""
    if layers is None:
        return ()
    from tensorferry.errors import SourceNotFound

    try:
        index = client.read_file(uri, INDEX_FILE)
    except SourceNotFound:
        return ()
    return stage_selection(index, layers)


def _expected(model: nn.Module) -> set[str]:
    """Parameters the checkpoint must fill (vLLM's own check, for unquantized models)."""
    return {name for name, _ in model.named_parameters()}
