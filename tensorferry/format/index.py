"""Parse and validate a ``model.safetensors.index.json``. The index is untrusted input."""

from __future__ import annotations

from typing import Any

from tensorferry.errors import InvalidArtifact, quote
from tensorferry.format.safetensors import DuplicateKeys, NestedTooDeeply, loads, too_many_tensors

INDEX_NAME = "model.safetensors.index.json"


def index_shards(raw: bytes, what: str, max_tensors: int) -> list[str]:
    """The shard names an index maps tensors to (CPU-bound for big indexes)."""
    hook = DuplicateKeys()
    try:
        doc: Any = loads(raw, hook) if raw else None
        weight_map = doc["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(s, str) for s in shards):
            raise TypeError
    except NestedTooDeeply:
        raise InvalidArtifact(f"{what} is not a valid index: it nests JSON too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InvalidArtifact(
            f"{what} is not a valid index: expected a JSON object with a "
            '"weight_map" of tensor name -> shard file name'
        ) from None
    if hook.first is not None and hook.first[0] is weight_map:
        raise InvalidArtifact(
            f"{what} is not a valid index: its weight_map names tensor {quote(hook.first[1])} twice"
        )
    # The index knows the tensor count before any header is read.
    if len(weight_map) > max_tensors:
        raise too_many_tensors(what, "lists", len(weight_map), max_tensors)
    return shards
