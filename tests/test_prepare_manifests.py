"""Malformed prepared manifests are refused before any arena is allocated."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import hypothesis.strategies as st
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings

from tensorferry.daemon.cpu_load import load_plan
from tensorferry.daemon.planner_prepared import plan_prepared_load
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.errors import InvalidArtifact, TensorferryError
from tensorferry.format.manifest import MANIFEST_NAME
from tensorferry.prepare.shardplan import parse_shard_plan
from tests._prepare_helpers import SHARD_PLAN, run_prepare, sharded_model


class MemoryStore(Store):
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.uri = "s3://mem/model/"
        self.objects = objects

    async def list_objects(self) -> list[ObjectInfo]:
        return [ObjectInfo(k, len(v), k) for k, v in sorted(self.objects.items())]

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        return self.objects[obj.key][start : start + length]

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        dest[:] = self.objects[obj.key][start : start + len(dest)]


class _NoWarmPool:
    async def settle(self) -> None:
        pass


class SpySink:
    def __init__(self) -> None:
        self.allocations: list[int] = []
        self.pool = _NoWarmPool()

    def allocate(self, size: int, what: str) -> Any:
        self.allocations.append(size)
        raise AssertionError("an arena was allocated for a malformed manifest")


@pytest.fixture(scope="module")
def valid_artifact(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("valid")
    sharded_model(root / "m")
    plan = parse_shard_plan(SHARD_PLAN, "plan.toml")
    run_prepare(str(root / "m"), str(root / "out"), plan=plan, world_size=2)
    return {p.name: p.read_bytes() for p in (root / "out").iterdir()}


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, doc
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        yield from _nodes(value, (*path, key))


# Per field: values that are always wrong for it (and would be for any valid manifest).
WRONG = [None, True, 1.5, "x", b"x", [], {}, -2, (1 << 64) - 1]
WRONG_FOR = {
    "split": [True, 1.5, "x", b"x", [], {}, -2],
    "crc32c": [b"abc", 7, None],
    "name": [None, True, 1.5, b"x", [], {}, -2, (1 << 64) - 1, ""],
    "files": [None, True, 1.5, "x", b"x", {}, -2, (1 << 64) - 1],
}
SHIFTS = {"offset": 1, "nbytes": 1, "size": -1, "version": 1, "world_size": 1}


@st.composite
def malformed(draw: st.DrawFn, valid: bytes) -> bytes:
    doc = msgpack.unpackb(valid)
    kind = draw(st.sampled_from(["bytes", "truncate", "drop", "wrong", "shift", "overlap"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    fields = [(p, v) for p, v in _nodes(doc) if p and isinstance(p[-1], str)]
    if kind == "shift":
        fields = [
            (p, v)
            for p, v in fields
            if p[-1] in SHIFTS and isinstance(v, int) and (p[-1] != "size" or p[0] == "objects")
        ]
    path, value = draw(st.sampled_from(fields))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "drop":
        del parent[path[-1]]
    elif kind == "wrong":
        parent[path[-1]] = draw(st.sampled_from(WRONG_FOR.get(path[-1], WRONG)))
    elif kind == "shift":
        parent[path[-1]] = value + SHIFTS[path[-1]]
    else:  # two non-empty slices of one object at one offset
        slices = [s for t in doc["tensors"] for s in t["slices"] if s["nbytes"] and not s["object"]]
        a, b = draw(st.permutations(slices))[:2]
        b["offset"] = a["offset"]
    return msgpack.packb(doc)


async def _load_with_spy(objects: dict[str, bytes], sink: SpySink) -> None:
    store = MemoryStore(objects)
    listing = await store.list_objects()
    plan = await plan_prepared_load(
        store, store.uri, listing, chunk_size=1 << 20, rank=1, world_size=2
    )
    noop = lambda _: None  # noqa: E731
    await load_plan(store, plan, store.uri, sink, concurrency=4, on_plan=noop, progress=noop)


def test_malformed_manifests_are_refused_before_any_arena(valid_artifact: dict[str, bytes]) -> None:
    with pytest.raises(AssertionError, match="an arena was allocated"):
        asyncio.run(_load_with_spy(valid_artifact, SpySink()))  # the valid one gets that far
    huge = {**valid_artifact, MANIFEST_NAME: b""}

    class Huge(MemoryStore):
        async def list_objects(self) -> list[ObjectInfo]:
            return [o if o.key != MANIFEST_NAME else ObjectInfo(o.key, 300 << 20, "x")
                    for o in await super().list_objects()]  # fmt: skip

    store = Huge(huge)
    with pytest.raises(InvalidArtifact) as info:
        asyncio.run(plan_prepared_load(store, store.uri, asyncio.run(store.list_objects()),
                                       chunk_size=1 << 20))  # fmt: skip
    assert info.value.message == (
        "s3://mem/model/tensorferry.manifest.msgpack has 314572800 bytes, more than a "
        "manifest may have (268435456); it is not a tensorferry manifest"
    )

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(malformed(valid_artifact[MANIFEST_NAME]))
    def check(raw: bytes) -> None:
        sink = SpySink()
        with pytest.raises(TensorferryError) as info:
            asyncio.run(_load_with_spy({**valid_artifact, MANIFEST_NAME: raw}, sink))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value.message
        assert sink.allocations == []

    check()
