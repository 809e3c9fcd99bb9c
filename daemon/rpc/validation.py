"""Validation of request fields: selections, ranks; what a source offers workers."""

from __future__ import annotations

from collections.abc import Sequence

from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.errors import InvalidRequest, quote
from tensorferry.format.manifest import MAX_WORLD_SIZE, RESERVED_PREFIX

MAX_PATTERNS = 10_000


def check_select(patterns: Sequence[str]) -> tuple[str, ...]:
    if len(patterns) > MAX_PATTERNS:
        raise InvalidRequest(f"a selection may have at most {MAX_PATTERNS} names or patterns")
    for p in patterns:
        if not p or len(p) > 1024:
            raise InvalidRequest(f"selection entry {quote(p)} must be 1..1024 characters")
    return tuple(sorted(set(patterns)))


def check_rank(rank: int, world_size: int) -> tuple[int, int]:
    """(rank, world_size), with a world of one rank folded into "no rank"."""
    if world_size > MAX_WORLD_SIZE:
        raise InvalidRequest(f"world_size {world_size} is above the limit of {MAX_WORLD_SIZE}")
    if rank >= max(world_size, 1):
        raise InvalidRequest(
            f"rank {rank} is not below world_size {world_size}: pass world_size=N and a rank 0..N-1"
        )
    return (rank, world_size) if world_size > 1 else (0, 0)


def extra_files(listing: list[ObjectInfo]) -> list[str]:
    # A prepared artifact's manifest and data objects are not files for workers.
    return sorted(
        o.key
        for o in listing
        if not o.key.endswith(".safetensors") and not o.key.startswith(RESERVED_PREFIX)
    )
