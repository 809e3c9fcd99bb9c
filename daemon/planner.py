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


def _chunks(obj: ObjectInfo, start: int, length: int, dest: int, chunk: int) -> list[Range]:
    return [
        Range(obj, start + pos, min(chunk, length - pos), dest + pos)
        for pos in range(0, length, chunk)
    ]


def make_plan(source: Source, chunk_size: int) -> Plan:
    """Place every file's data section verbatim, then relocate misaligned tensors.

    safetensors writers keep tensors aligned to their dtype, but the format does not
    require it, and a view of a misaligned offset cannot be built. Such a tensor also gets
    its own aligned slot after the data sections, fetched by its own range(s).
    """
    tensors: list[PlannedTensor] = []
    ranges: list[Range] = []
    misaligned: list[tuple[ObjectInfo, int, str, str, tuple[int, ...], int]] = []
    seen: dict[str, str] = {}
    cursor = 0
    for obj, header in source.files:
        base = align_up(cursor)
        for t in header.tensors:
            if t.name in seen:
                raise InvalidArtifact(
                    f"{source.ref.uri}: tensor {t.name!r} appears in both {seen[t.name]} "
                    f"and {obj.key}"
                )
            seen[t.name] = obj.key
            if t.begin % DTYPE_SIZES[t.dtype]:
                misaligned.append(
                    (obj, header.data_start + t.begin, t.name, t.dtype, t.shape, t.nbytes)
                )
            else:
                tensors.append(PlannedTensor(t.name, t.dtype, t.shape, base + t.begin, t.nbytes))
        ranges.extend(_chunks(obj, header.data_start, header.data_len, base, chunk_size))
        cursor = base + header.data_len
    for obj, start, name, dtype, shape, nbytes in misaligned:
        slot = align_up(cursor, 256)
        tensors.append(PlannedTensor(name, dtype, shape, slot, nbytes))
        ranges.extend(_chunks(obj, start, nbytes, slot, chunk_size))
        cursor = slot + nbytes
    tensors.sort(key=lambda t: t.name)
    return Plan(tuple(tensors), tuple(ranges), align_up(max(cursor, 1)))
