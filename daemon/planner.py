"""Plan a load: where each tensor lives in the arena, and which byte ranges to fetch.

Each file's data section is copied verbatim to a 4 KiB-aligned base in the arena, so a
tensor's arena offset is base + its offset in the data section, and the fetch is a run of
uniform chunks (the last one shorter) that land at their final place with no extra copy.
"""

from __future__ import annotations

import dataclasses

from tensorferry.daemon.safetensors import DTYPE_SIZES
from tensorferry.daemon.source import Source
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.errors import InvalidArtifact

ARENA_ALIGN = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the arena
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    obj: ObjectInfo
    start: int  # in the object
    length: int
    arena_offset: int


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    tensors: tuple[PlannedTensor, ...]
    ranges: tuple[Range, ...]
    arena_size: int

    @property
    def fetch_bytes(self) -> int:
        return sum(r.length for r in self.ranges)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def align_up(n: int, to: int = ARENA_ALIGN) -> int:
    return (n + to - 1) // to * to


def make_plan(source: Source, chunk_size: int) -> Plan:
    tensors: list[PlannedTensor] = []
    ranges: list[Range] = []
    seen: dict[str, str] = {}
    cursor = 0
    for obj, header in source.files:
        base = align_up(cursor)
        for t in header.tensors:
            if t.name in seen:
                raise InvalidArtifact(
                    f"tensor {t.name!r} appears in both {seen[t.name]} and {obj.key}"
                )
            seen[t.name] = obj.key
            size = DTYPE_SIZES[t.dtype]
            if t.begin % size:
                raise InvalidArtifact(
                    f"{source.ref.uri}: tensor {t.name!r} in {obj.key} starts at byte "
                    f"{t.begin} of the data section, which is not a multiple of its dtype "
                    f"size ({t.dtype}: {size} bytes); re-save the file with safetensors"
                )
            tensors.append(PlannedTensor(t.name, t.dtype, t.shape, base + t.begin, t.nbytes))
        for pos in range(0, header.data_len, chunk_size):
            length = min(chunk_size, header.data_len - pos)
            ranges.append(Range(obj, header.data_start + pos, length, base + pos))
        cursor = base + header.data_len
    tensors.sort(key=lambda t: t.name)
    return Plan(tuple(tensors), tuple(ranges), align_up(max(cursor, 1)))
