"""The disk tier: hits skip the store, chunks are verified on read, the budget holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.store.cache import CachingStore, DiskTier


class CountingStore(Store):
    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data
        self.uri = "s3://bucket/model/"
        self.reads = 0

    async def list_objects(self) -> list[ObjectInfo]:
        return [ObjectInfo(k, len(v), f"etag-{hash(v)}") for k, v in self.data.items()]

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        return self.data[obj.key][start : start + length]

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        self.reads += 1
        dest[:] = self.data[obj.key][start : start + len(dest)]


def fetch(store: Store, obj: ObjectInfo, start: int, length: int) -> bytes:
    buf = bytearray(length)
    asyncio.run(store.read_into(obj, start, memoryview(buf)))
    return bytes(buf)


def test_hits_skip_the_store_and_survive_a_restart(tmp_path: Path) -> None:
    inner = CountingStore({"a": bytes(range(256)) * 64})
    obj = asyncio.run(inner.list_objects())[0]
    store = CachingStore(inner, DiskTier(tmp_path, 1 << 20))
    assert fetch(store, obj, 100, 1000) == inner.data["a"][100:1100]
    assert fetch(store, obj, 100, 1000) == inner.data["a"][100:1100]
    assert inner.reads == 1
    restarted = CachingStore(inner, DiskTier(tmp_path, 1 << 20))  # a new daemon, same dir
    assert fetch(restarted, obj, 100, 1000) == inner.data["a"][100:1100]
    assert inner.reads == 1
    assert restarted.tier.hits == 1
    other_version = ObjectInfo("a", obj.size, "another-etag")
    fetch(restarted, other_version, 100, 1000)
    assert inner.reads == 2  # a new ETag never hits an old chunk


def test_a_corrupt_chunk_is_detected_and_refetched(tmp_path: Path) -> None:
    inner = CountingStore({"a": b"x" * 4096})
    obj = asyncio.run(inner.list_objects())[0]
    store = CachingStore(inner, DiskTier(tmp_path, 1 << 20))
    fetch(store, obj, 0, 4096)
    (chunk,) = tmp_path.glob("*/*.chunk")
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(raw)
    assert fetch(store, obj, 0, 4096) == b"x" * 4096
    assert inner.reads == 2
    assert store.tier.corrupt == 1
    assert fetch(store, obj, 0, 4096) == b"x" * 4096  # rewritten good copy
    assert inner.reads == 2
    store.forget(obj, 0, 4096)  # what the fetch stage does after a failed checksum
    assert list(tmp_path.glob("*/*.chunk")) == []


def test_budget_evicts_least_recently_used_chunks(tmp_path: Path) -> None:
    inner = CountingStore({"a": bytes(4096 * 8)})
    obj = asyncio.run(inner.list_objects())[0]
    tier = DiskTier(tmp_path, 3 * (4096 + 4))
    store = CachingStore(inner, tier)
    for i in range(3):
        fetch(store, obj, i * 4096, 4096)
    fetch(store, obj, 0, 4096)  # chunk 0 is now the most recently used
    fetch(store, obj, 3 * 4096, 4096)  # needs room: chunk 1 goes
    assert tier.bytes <= tier.budget
    reads = inner.reads
    fetch(store, obj, 0, 4096)
    assert inner.reads == reads  # still cached
    fetch(store, obj, 4096, 4096)
    assert inner.reads == reads + 1  # evicted
