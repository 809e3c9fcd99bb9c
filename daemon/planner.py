"""Plan a load: where each tensor lives in the arena, and which byte ranges to fetch.

Ranges land at their final place in the arena: no copy after the fetch.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable

from tensorferry.daemon.source import Source
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.errors import InvalidArtifact, InvalidRequest, quote
from tensorferry.format.safetensors import DTYPE_SIZES, TensorEntry

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
    #: (offset in the range, length, crc32c) of each chunk to verify once it lands.
    checks: tuple[tuple[int, int, int], ...] = ()


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
    """Cut ``length`` bytes from ``start`` at object offsets that are multiples of ``chunk``.

    Stores keep large objects as parts or chunks (multipart uploads of 8 MiB, SeaweedFS
    chunks): a range that straddles two costs the server two lookups and reads. Measured on
    SeaweedFS, ranges shifted off those boundaries by the safetensors header took 30-50 %
    more server CPU per byte and ran 20 % slower; the price here is one short first range.
    """
    ranges: list[Range] = []
    pos, end = start, start + length
    while pos < end:
        cut = min((pos // chunk + 1) * chunk, end)
        ranges.append(Range(obj, pos, cut - pos, dest + pos - start))
        pos = cut
    return ranges


def selector(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    if not patterns:
        return lambda name: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda name: regex.match(name) is not None


def _runs(tensors: list[TensorEntry]) -> list[list[TensorEntry]]:
    """Group tensors whose bytes touch, so one range can carry several of them.

    Only touching tensors merge: a gap would mean fetching bytes nobody selected.
    """
    runs: list[list[TensorEntry]] = []
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if runs and t.begin == runs[-1][-1].end:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def make_plan(source: Source, chunk_size: int, select: tuple[str, ...] = ()) -> Plan:
    """Lay out the selected tensors in the arena and cut their bytes into ranges.

    A run of touching tensors lands verbatim at a base congruent to its file offset modulo
    4 KiB, so every tensor keeps the alignment it had in its file; with no selection, each
    file's data section is one run and arrives as uniform chunks. safetensors writers keep
    tensors aligned to their dtype, but the format does not require it, and a view of a
    misaligned offset cannot be built: such a tensor gets its own aligned slot.
    """
    wanted = selector(select)
    tensors: list[PlannedTensor] = []
    ranges: list[Range] = []
    misaligned: list[tuple[ObjectInfo, int, TensorEntry]] = []
    seen: dict[str, str] = {}
    matched: set[str] = set()
    cursor = 0
    for obj, header in source.files:
        chosen: list[TensorEntry] = []
        for t in header.tensors:
            if t.name in seen:
                raise InvalidArtifact(
                    f"{source.ref.uri}: tensor {quote(t.name)} appears in both {seen[t.name]} "
                    f"and {obj.key}"
                )
            seen[t.name] = obj.key
            if not wanted(t.name):
                continue
            matched.add(t.name)
            if t.begin % DTYPE_SIZES[t.dtype]:
                misaligned.append((obj, header.data_start, t))
            else:
                chosen.append(t)
        for run in _runs(chosen):
            begin, end = run[0].begin, run[-1].end
            base = align_up(cursor) + begin % ARENA_ALIGN
            for t in run:
                offset = base + t.begin - begin
                tensors.append(PlannedTensor(t.name, t.dtype, t.shape, offset, t.nbytes))
            ranges.extend(_chunks(obj, header.data_start + begin, end - begin, base, chunk_size))
            cursor = base + end - begin
    for obj, data_start, t in misaligned:
        slot = align_up(cursor, 256)
        tensors.append(PlannedTensor(t.name, t.dtype, t.shape, slot, t.nbytes))
        ranges.extend(_chunks(obj, data_start + t.begin, t.nbytes, slot, chunk_size))
        cursor = slot + t.nbytes
    for pattern in select:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in matched):
            raise InvalidRequest(f"{source.ref.uri}: selection {quote(pattern)} matches no tensor")
    tensors.sort(key=lambda t: t.name)
    return Plan(tuple(tensors), tuple(ranges), align_up(max(cursor, 1)))
