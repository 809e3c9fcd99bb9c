"""Plan a load: where each tensor lives in the arena, and which byte ranges to fetch.

Ranges land at their final place in the arena: no copy after the fetch.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import operator
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from tensorferry.daemon.steps import Steps, at_once, stepwise
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.errors import InvalidArtifact, InvalidRequest, quote
from tensorferry.format.safetensors import DTYPE_SIZES, TensorEntry

if TYPE_CHECKING:  # source imports the fetch stage, which imports this module
    from tensorferry.daemon.source import Source

ARENA_ALIGN = 4096
#: Tensors planned between two yields to the event loop (a few milliseconds).
STEP = 2000


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
    #: Retries the reads before the plan took (headers, index), by cause.
    read_retries: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter[str]
    )

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


def _runs(chosen: list[int], begins: list[int], ends: list[int]) -> list[list[int]]:
    """Group tensors (indexes into a header's entries, in offset order) whose bytes touch,
    so one range can carry several of them.

    Only touching tensors merge: a gap would mean fetching bytes nobody selected.
    """
    runs: list[list[int]] = []
    for i in chosen:
        if runs and begins[i] == ends[runs[-1][-1]]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def make_plan(source: Source, chunk_size: int, select: tuple[str, ...] = ()) -> Plan:
    """Lay out the selected tensors in the arena and cut their bytes into ranges.

    A run of touching tensors lands verbatim at a base congruent to its file offset modulo
    4 KiB, so every tensor keeps the alignment it had in its file; with no selection, each
    file's data section is one run and arrives as uniform chunks. safetensors writers keep
    tensors aligned to their dtype, but the format does not require it, and a view of a
    misaligned offset cannot be built: such a tensor gets its own aligned slot.
    """
    return at_once(plan_steps(source, chunk_size, select))


async def plan_load(source: Source, chunk_size: int, select: tuple[str, ...] = ()) -> Plan:
    """``make_plan`` on the event loop, in steps: 200k tensors cost it about half a second
    of Python, and Status, leases and other loads run between the steps."""
    return await stepwise(plan_steps(source, chunk_size, select))


def plan_steps(source: Source, chunk_size: int, select: tuple[str, ...] = ()) -> Steps[Plan]:
    """``make_plan``'s work, yielding after each ``STEP`` tensors."""
    wanted = selector(select)
    tensors: list[PlannedTensor] = []
    ranges: list[Range] = []
    misaligned: list[tuple[ObjectInfo, int, TensorEntry]] = []
    seen: dict[str, str] = {}
    matched: list[str] = []
    cursor = 0
    for obj, header in source.files:
        entries = header.tensors
        names, dtypes, shapes = entries.names, entries.dtypes, entries.shapes
        begins, ends = entries.begins, entries.ends
        chosen: list[int] = []
        for i, name in enumerate(names):
            if name in seen:
                raise InvalidArtifact(
                    f"{source.ref.uri}: tensor {quote(name)} appears in both {seen[name]} "
                    f"and {obj.key}"
                )
            seen[name] = obj.key
            if i % STEP == STEP - 1:
                yield
            if not wanted(name):
                continue
            matched.append(name)
            if begins[i] % DTYPE_SIZES[dtypes[i]]:
                misaligned.append((obj, header.data_start, entries[i]))
            else:
                chosen.append(i)
        yield
        for run in _runs(chosen, begins, ends):
            begin, end = begins[run[0]], ends[run[-1]]
            base = align_up(cursor) + begin % ARENA_ALIGN
            for i in run:
                offset = base + begins[i] - begin
                tensors.append(
                    PlannedTensor(names[i], dtypes[i], shapes[i], offset, ends[i] - begins[i])
                )
                if len(tensors) % STEP == 0:
                    yield
            ranges.extend(_chunks(obj, header.data_start + begin, end - begin, base, chunk_size))
            cursor = base + end - begin
    for obj, data_start, t in misaligned:
        slot = align_up(cursor, 256)
        tensors.append(PlannedTensor(t.name, t.dtype, t.shape, slot, t.nbytes))
        ranges.extend(_chunks(obj, data_start + t.begin, t.nbytes, slot, chunk_size))
        cursor = slot + t.nbytes
    for pattern in select:
        yield from _matches_some(pattern, matched, source.ref.uri)
    yield
    tensors.sort(key=operator.attrgetter("name"))
    return Plan(tuple(tensors), tuple(ranges), align_up(max(cursor, 1)), source.read_retries)


def _matches_some(pattern: str, names: list[str], uri: str) -> Steps[None]:
    match = re.compile(fnmatch.translate(pattern)).match
    for i in range(0, len(names), STEP):
        if any(match(name) for name in names[i : i + STEP]):
            return
        yield
    raise InvalidRequest(f"{uri}: selection {quote(pattern)} matches no tensor")
