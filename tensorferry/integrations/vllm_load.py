"""One rank's load as the vLLM loader runs it, without vLLM: where its weights go (which
device, which rank's share), feeding them to the model, and handing the daemon's GPU copy
back once the engine holds its own.

Kept apart from ``tensorferry.integrations.vllm`` (which imports vLLM) so that it is
tested on the fake CUDA API, where vLLM cannot place anything on a GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from tensorferry.client import close_released_gpu_mappings
from tensorferry.integrations.vllm_options import LoaderOptions, Weights

if TYPE_CHECKING:
    import torch

    from tensorferry.client import Client

#: Seconds to wait for this process's lease on an evicted GPU copy to end.
RELEASE_WAIT = 10.0
#: The model's ``load_weights``: takes (name, tensor) pairs, returns the names it loaded
#: (None where a model does not say).
LoadFn = Callable[[Iterator[tuple[str, "torch.Tensor"]]], Iterable[str] | None]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one rank asks the daemon to put the weights."""

    device: str
    #: Sent to the daemon as ``rank``/``world_size``; (0, 0): the whole model.
    rank: int = 0
    world_size: int = 0


def placement(device: str, gpu: str, tp_rank: int, tp_size: int) -> Placement:
    """``device``: the loader option; ``gpu``: this rank's GPU ("cuda:N", or "cuda" for
    the CUDA API's current device). In the CPU arena every rank attaches to one copy of
    the whole model and vLLM's weight loaders take each rank's slice; on a GPU each rank
    places only its own share, so it passes its rank (a source without per-rank shards is
    refused by the daemon, before anything is placed)."""
    if device == "cpu":
        return Placement("cpu")
    if tp_size > 1:
        return Placement(gpu, tp_rank, tp_size)
    return Placement(gpu)


@dataclasses.dataclass(frozen=True)
class Fed:
    """What one rank's load did."""

    weights: Weights
    #: What ``load_weights`` returned (None: the model does not say).
    loaded: set[str] | None
    #: The model was already resident (no fetch).
    attached: bool
    #: The daemon's GPU copy was evicted once the engine held its own.
    released: bool


def feed(
    client: Client, uri: str, where: Placement, options: LoaderOptions, *, name: str,
    select: tuple[str, ...], load: LoadFn,
) -> Fed:  # fmt: skip
    """Stream the weights into ``load`` (a copy into the engine's parameters), end the
    lease, and, for a GPU arena, evict the daemon's copy unless ``keep_gpu_copy``."""
    stream = client.stream(
        uri, where.device, timeout=options.timeout, client_name=name, select=select,
        rank=where.rank, world_size=where.world_size,
    )  # fmt: skip
    weights = Weights(stream)
    try:
        returned = load(iter(weights))
    except Exception as exc:
        raise weights.mismatch(uri, exc) from exc
    model = stream.model
    attached, model_id = model.attached, model.model_id
    model.close()
    del stream, model  # the views go, and with them the lease
    if where.device != "cpu":
        # Views the load left in a reference cycle go only at a collection, and their
        # finalizer only queues the mapping's close (#27): collect, then close, before the
        # eviction, or the daemon's copy waits for this lease that nothing would end.
        gc.collect()
        close_released_gpu_mappings()
    released = False
    if where.device != "cpu" and not options.keep_gpu_copy:
        released = release_gpu_copy(client, model_id, name)
    loaded = None if returned is None else set(returned)
    return Fed(weights, loaded, attached, released)


def release_gpu_copy(client: Client, model_id: str, name: str) -> bool:
    """Evict the daemon's GPU copy this engine has copied from: vLLM's next start on this
    GPU needs ``gpu_memory_utilization`` of it free, and this engine's memory profiling,
    right after the load, would count the copy as its own. Not while another load waits
    for the model (the last one evicts it), nor a pinned one; an engine still holding a
    lease on it keeps the memory until that lease ends."""
    info = next((m for m in client.list() if m.model_id == model_id), None)
    if info is None or info.pinned or info.waiting or info.state != "ready":
        return False
    evicted = client.evict(model_id, client_name=name)
    if model_id not in evicted.evicted:
        return False
    # The daemon frees it when the last lease ends: ours ends once its views are gone and
    # their mapping closed, each time round. Another engine's lease is not waited for.
    deadline = time.monotonic() + RELEASE_WAIT
    pause = 0.01
    gc.collect()  # once: a full collection in a large engine process takes a while
    while evicted.pending_leases and time.monotonic() < deadline:
        close_released_gpu_mappings()
        held = [m for m in client.list() if m.model_id == model_id]
        if not held or name not in held[0].lease_clients:
            break
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.2)
    return True
