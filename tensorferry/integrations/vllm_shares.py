"""A per-rank artifact's tensors into vLLM's tensor-parallel layers, which expect whole
checkpoint tensors and cut this rank's share out of each themselves.

A tensor the artifact split (``tensorferry prepare --shard-plan FILE --tp N``) arrives as
this rank's share already; one it replicated arrives whole. A layer's weight loader is
told which: a tensor as wide as the layer's whole dimension is cut as vLLM always cuts
it, any other is taken as this rank's share as it is (vLLM's loaders then check its shape
against the parameter, so a share cut some other way fails, naming the tensor, rather
than loading the wrong rows). Imported only by ``tensorferry.integrations.vllm``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

Loader = Callable[..., Any]


@contextlib.contextmanager
def rank_shares(model: nn.Module) -> Iterator[None]:
    """While loading: the tensor-parallel linear layers take rank shares as they are."""
    restore: list[Callable[[], None]] = []
    try:
        for module in model.modules():
            if isinstance(module, ColumnParallelLinear | RowParallelLinear) and module.tp_size > 1:
                for param in module.parameters(recurse=False):
                    restore.append(_wrap(module, param))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _wrap(module: nn.Module, param: nn.Parameter) -> Callable[[], None]:
    # vLLM's own parameters keep their loader behind a property; plain ones (biases) in
    # an attribute.
    slot = "_weight_loader" if hasattr(param, "_weight_loader") else "weight_loader"
    original: Loader | None = getattr(param, slot, None)
    if original is None:
        return lambda: None

    def load(p: nn.Parameter, loaded: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        dim, whole = _whole_size(module, p, shard)
        if dim is None or loaded.dim() <= dim or loaded.shape[dim] == whole:
            return original(p, loaded, *args, **kwargs)
        with _as_share(p):
            return original(p, loaded, *args, **kwargs)

    setattr(param, slot, load)
    return lambda: setattr(param, slot, original)


def _whole_size(module: Any, param: nn.Parameter, shard: object) -> tuple[int | None, int]:
    """The dimension vLLM cuts a rank's share from, and its whole checkpoint size."""
    if isinstance(module, RowParallelLinear):
        return getattr(param, "input_dim", None), int(module.input_size)
    dim = getattr(param, "output_dim", None)
    if isinstance(module, QKVParallelLinear) and shard in ("q", "k", "v"):
        heads = module.total_num_heads if shard == "q" else module.total_num_kv_heads
        size = module.v_head_size if shard == "v" else module.head_size
        return dim, int(heads * size)
    if isinstance(module, MergedColumnParallelLinear) and isinstance(shard, int):
        return dim, int(module.output_sizes[shard])
    return dim, int(module.output_size)


@contextlib.contextmanager
def _as_share(param: nn.Parameter) -> Iterator[None]:
    """vLLM's loaders cut at ``tp_rank * share`` (its parameters' loaders) or skip the
    cut for ``is_sharded_weight`` (the layers' own): offset 0 and no cut take the share
    as it came."""
    saved = {k: getattr(param, k) for k in ("tp_rank", "is_sharded_weight") if hasattr(param, k)}
    setattr(param, "tp_rank", 0)  # noqa: B010 (not a torch attribute)
    setattr(param, "is_sharded_weight", True)  # noqa: B010
    try:
        yield
    finally:
        for key in ("tp_rank", "is_sharded_weight"):
            if key in saved:
                setattr(param, key, saved[key])
            else:
                delattr(param, key)
