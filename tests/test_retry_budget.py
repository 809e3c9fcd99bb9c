"""Reading a range again after its checksum failed spends the load's retry budget, as a
retried GET does (#25): a path that corrupts every range must fail the load, not read each
range three times. Unit level: an in-process store that flips bytes on chosen reads."""

from __future__ import annotations

import collections

import crc32c
import pytest

from tensorferry.daemon.fetch.retries import Budget, FetchPolicy
from tensorferry.daemon.fetch.scheduler import (
    Destination,
    FetchStats,
    _fetch_one,
    fetch_ranges,
)
from tensorferry.daemon.planner import Range
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.errors import DataLoss

OBJ = ObjectInfo("tensorferry.data.shared", 1 << 14, "etag")
DATA = bytes(range(256)) * (OBJ.size // 256)
RANGE = 4096


class CorruptingStore(Store):
    """``DATA`` with one byte flipped on the first ``bad_reads[start]`` reads of each range."""

    uri = "mem://m/"

    def __init__(self, bad_reads: dict[int, int]) -> None:
        self.bad_reads = collections.Counter(bad_reads)
        self.reads: list[int] = []
        self.forgotten: list[tuple[int, int]] = []

    async def list_objects(self) -> list[ObjectInfo]:
        return [OBJ]

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        return DATA[start : start + length]

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        self.reads.append(start)
        dest[:] = DATA[start : start + len(dest)]
        if self.bad_reads[start] > 0:
            self.bad_reads[start] -= 1
            dest[100] ^= 0x55

    def forget(self, obj: ObjectInfo, start: int, length: int) -> None:
        self.forgotten.append((start, length))


class IntoBuffer(Destination[Range, None]):
    def __init__(self) -> None:
        self.buf = bytearray(OBJ.size)

    def place(self, job: Range, lent: None) -> tuple[Range, memoryview]:
        return job, memoryview(self.buf)[job.arena_offset : job.arena_offset + job.length]


def checked(start: int) -> Range:
    crc = crc32c.crc32c(DATA[start : start + RANGE])
    return Range(OBJ, start, RANGE, start, checks=((0, RANGE, crc),))


async def test_each_re_read_spends_the_budget() -> None:
    store, dest = CorruptingStore({0: 2}), IntoBuffer()
    budget, stats = Budget(3), FetchStats()
    r, view = dest.place(checked(0), None)
    await _fetch_one(store, r, view, FetchPolicy(hedge=False), budget, stats, None)
    assert bytes(view) == DATA[:RANGE]
    assert (budget.left, stats.retries, dict(stats.causes)) == (1, 2, {"checksum": 2})
    assert store.forgotten == [(0, RANGE), (0, RANGE)]


async def test_a_load_stops_once_re_reads_spend_the_budget() -> None:
    # Budget 1 (and none per 8 ranges for 2 ranges): the first range's re-read spends it.
    store = CorruptingStore({0: 1, RANGE: 1})
    policy = FetchPolicy(budget=1, hedge=False, max_concurrency=1)
    with pytest.raises(DataLoss) as info:
        await fetch_ranges(store, [checked(0), checked(RANGE)], IntoBuffer(), concurrency=1,
                           policy=policy)  # fmt: skip
    assert info.value.message == (
        f"mem://m/tensorferry.data.shared: the chunk at byte {RANGE} ({RANGE} bytes) failed "
        "its crc32c check and the load's retry budget is exhausted (1 retried, 1 of them "
        "after a failed check): bytes arrive corrupted, so check the path to the store (a "
        "proxy or cache on the way, the network) and load again; run `tensorferry prepare` "
        "again if the stored artifact itself is corrupt"
    )
    assert store.reads == [0, 0, RANGE]  # the second range was not read again
    assert store.forgotten == [(0, RANGE), (RANGE, RANGE)]
