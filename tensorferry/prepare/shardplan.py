"""Shard plans: which tensors `tensorferry prepare` splits across tensor-parallel ranks.

A TOML file of rules; the first rule whose glob matches a tensor's name decides, and a
tensor no rule matches is replicated (every rank reads the same bytes)::

    version = 1

    [[shard]]
    match = ["*.self_attn.qkv_proj.weight"]
    split = "column"             # dim 0: output features of a [out, in] weight
    fused = [4096, 1024, 1024]   # Q, K, V: each part is split on its own

    [[shard]]
    match = ["*.o_proj.weight", "*.down_proj.weight"]
    split = "row"                # dim 1: input features

    [[shard]]
    match = "*.norm.weight"
    split = "none"               # replicated, even if a later rule would match

``dim = N`` (negative counts from the end) may stand instead of ``split``. A dimension
that does not divide by the world size is split as torch.tensor_split does (the first
``size % N`` ranks get one more), unless the rule says ``uneven = "error"``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from pathlib import Path
from typing import Any

from tensorferry.errors import InvalidRequest
from tensorferry.format.manifest import MAX_WORLD_SIZE, Split

_SPLITS = {"column": 0, "row": 1, "none": None}
_KEYS = {"match", "split", "dim", "fused", "uneven"}


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    number: int  # 1-based, as the file lists it
    patterns: tuple[str, ...]
    dim: int | None  # None: replicate
    fused: tuple[int, ...]
    uneven: str  # "balanced" or "error"


@dataclasses.dataclass(frozen=True, slots=True)
class ShardPlan:
    path: str
    rules: tuple[Rule, ...]

    def rule_for(self, name: str) -> Rule | None:
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(name, p) for p in rule.patterns):
                return rule
        return None

    def split_for(self, name: str, shape: tuple[int, ...], world_size: int) -> Split | None:
        """How ``name`` is split, or None when it is replicated."""
        rule = self.rule_for(name)
        if rule is None or rule.dim is None:
            return None
        where = f"{self.path}: shard rule {rule.number}"
        dim = rule.dim + len(shape) if rule.dim < 0 else rule.dim
        if not 0 <= dim < len(shape):
            raise InvalidRequest(
                f"{where} splits dim {rule.dim} of {name!r}, which has shape {list(shape)}; "
                'narrow its match, or put a rule with split = "none" for it first'
            )
        parts = rule.fused or (shape[dim],)
        if sum(parts) != shape[dim]:
            raise InvalidRequest(
                f"{where}: fused sizes {list(parts)} add up to {sum(parts)}, but dim {dim} of "
                f"{name!r} (shape {list(shape)}) has {shape[dim]}"
            )
        if rule.uneven == "error":
            for part in parts:
                if part % world_size:
                    raise InvalidRequest(
                        f"{where}: dim {dim} of {name!r} ({part} of shape {list(shape)}) does "
                        f"not split evenly into {world_size} ranks, and the rule says "
                        'uneven = "error"'
                    )
        return Split(dim, parts)


def _rule(path: str, number: int, raw: Any) -> Rule:
    where = f"{path}: shard rule {number}"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} is not a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InvalidRequest(f"{where} has unknown keys {unknown} (known: {sorted(_KEYS)})")
    match = raw.get("match")
    patterns = (match,) if isinstance(match, str) else match
    if (
        not isinstance(patterns, list | tuple)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise InvalidRequest(f'{where} needs match = "glob" or a list of globs')
    if ("split" in raw) == ("dim" in raw):
        raise InvalidRequest(f'{where} needs one of split = "column" | "row" | "none", or dim = N')
    if "split" in raw:
        if raw["split"] not in _SPLITS:
            raise InvalidRequest(f'{where}: split must be "column", "row" or "none"')
        dim = _SPLITS[raw["split"]]
    else:
        dim = raw["dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or not -64 <= dim < 64:
            raise InvalidRequest(f"{where}: dim must be an integer (negative counts from the end)")
    fused = raw.get("fused", [])
    if not isinstance(fused, list) or not all(
        isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in fused
    ):
        raise InvalidRequest(f"{where}: fused must be a list of positive sizes")
    if fused and dim is None:
        raise InvalidRequest(f'{where}: fused needs a split dimension, not split = "none"')
    uneven = raw.get("uneven", "balanced")
    if uneven not in ("balanced", "error"):
        raise InvalidRequest(f'{where}: uneven must be "balanced" or "error"')
    return Rule(number, tuple(patterns), dim, tuple(fused), uneven)


def parse_shard_plan(text: str, path: str) -> ShardPlan:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{path} is not a valid shard plan (TOML): {exc}") from None
    unknown = sorted(set(doc) - {"version", "shard"})
    if unknown:
        raise InvalidRequest(f"{path}: unknown top-level keys {unknown} (known: version, shard)")
    if doc.get("version", 1) != 1:
        raise InvalidRequest(f"{path}: shard plan version {doc['version']!r} is not 1")
    rules = doc.get("shard", [])
    if not isinstance(rules, list):
        raise InvalidRequest(f"{path}: shard must be [[shard]] tables, one per rule")
    if not rules:
        raise InvalidRequest(f"{path} has no [[shard]] rules")
    return ShardPlan(path, tuple(_rule(path, i + 1, r) for i, r in enumerate(rules)))


def load_shard_plan(path: str | Path) -> ShardPlan:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidRequest(f"cannot read the shard plan {path}: {exc.strerror}") from None
    return parse_shard_plan(text, str(path))


def check_world_size(world_size: int, plan: ShardPlan | None) -> None:
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise InvalidRequest(f"--tp must be 1..{MAX_WORLD_SIZE}, got {world_size}")
    if plan is None and world_size > 1:
        raise InvalidRequest(f"--tp {world_size} needs --shard-plan FILE: which tensors to split")
    if plan is not None and world_size < 2:
        raise InvalidRequest(f"--shard-plan {plan.path} needs --tp N with N >= 2")
