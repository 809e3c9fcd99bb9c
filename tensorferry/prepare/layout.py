"""Where every tensor (or rank slice) goes in the output objects, and the read schedule that
gets it there.

Each source file is read once, front to back, in pieces of at most ``BLOCK`` bytes; each
piece says where its bytes go. Slices are written in source order, except small tensors
held back to fill the gap before a large tensor on the chunk grid (at most ``HOLD_BYTES``),
so every output object is written front to back too, and memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tensorferry.daemon.planner import align_up
from tensorferry.daemon.source import Source
from tensorferry.errors import InvalidArtifact
from tensorferry.format.manifest import SHARED, DataObject, Split, balanced, slice_shape
from tensorferry.format.safetensors import DTYPE_SIZES
from tensorferry.prepare.shardplan import ShardPlan

BLOCK = 8 << 20
SHARED_NAME = "tensorferry.data.shared"


def rank_object_name(rank: int, world_size: int) -> str:
    return f"tensorferry.data.rank-{rank:05d}-of-{world_size:05d}"


@dataclasses.dataclass(slots=True)
class OutSlice:
    object: int
    offset: int
    shape: tuple[int, ...]
    nbytes: int
    crc: list[int] = dataclasses.field(default_factory=list)  # filled in as bytes pass


@dataclasses.dataclass(slots=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    split: Split | None
    slices: list[OutSlice]


class Sink(Protocol):
    """What an output object offers a route (an ``ObjectBuilder``).

    ``slice`` names the slice the bytes belong to when it may come out of offset order
    (a small tensor held back, see ``make_layout``); None means the next one in order.
    """

    def write(self, data: memoryview, slice: OutSlice | None = None) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class ToObject:
    """All of the piece's bytes, in order, to one slice of one object."""

    object: int
    slice: OutSlice | None = None

    def apply(self, data: memoryview, sinks: Sequence[Sink]) -> None:
        sinks[self.object].write(data, self.slice)


@dataclasses.dataclass(frozen=True, slots=True)
class SplitRows:
    """The piece holds whole rows (everything from the split dim inwards); rank r's part
    of each row is ``spans[r]``, byte ranges in the row, written as one block per rank."""

    rows: int
    row_bytes: int
    spans: tuple[tuple[tuple[int, int], ...], ...]
    objects: tuple[int, ...]

    def apply(self, data: memoryview, sinks: Sequence[Sink]) -> None:
        table = np.frombuffer(data, np.uint8).reshape(self.rows, self.row_bytes)
        for spans, obj in zip(self.spans, self.objects, strict=True):
            blocks = [table[:, a:b] for a, b in spans if b > a]
            if blocks:
                out = np.ascontiguousarray(np.concatenate(blocks, axis=1))
                sinks[obj].write(memoryview(out.data).cast("B"))


Route = ToObject | SplitRows | None  # None: hashed only (headers, gaps)


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    file: int  # index into Source.files
    start: int  # in the file
    length: int
    route: Route


@dataclasses.dataclass(slots=True)
class Layout:
    objects: list[DataObject]
    tensors: list[OutTensor]
    pieces: list[Piece]
    slices: list[list[OutSlice]]  # per object, in offset order

    @property
    def source_bytes(self) -> int:
        return sum(p.length for p in self.pieces)


def _cut(file: int, start: int, length: int, route: Route) -> list[Piece]:
    return [
        Piece(file, start + pos, min(BLOCK, length - pos), route) for pos in range(0, length, BLOCK)
    ]


def _rank_spans(split: Split, world: int, inner: int) -> list[list[tuple[int, int]]]:
    """Byte ranges of each rank's share of one row, part by part."""
    spans: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    start = 0
    for part in split.parts:
        for r in range(world):
            n = balanced(part, world, r)
            spans[r].append((start * inner, (start + n) * inner))
            start += n
    return spans


def _split_pieces(
    file: int, begin: int, shape: tuple[int, ...], itemsize: int, split: Split,
    world: int, objects: list[int],
) -> list[Piece]:  # fmt: skip
    inner = math.prod(shape[split.dim + 1 :]) * itemsize
    outer = math.prod(shape[: split.dim])
    row = shape[split.dim] * inner
    spans = _rank_spans(split, world, inner)
    if outer > 1 and row <= BLOCK:
        per = max(1, BLOCK // row)
        frozen = tuple(tuple(s) for s in spans)
        return [
            Piece(file, begin + o * row, min(per, outer - o) * row,
                  SplitRows(min(per, outer - o), row, frozen, tuple(objects)))
            for o in range(0, outer, per)
        ]  # fmt: skip
    # One row per rank and part is contiguous: cut it into plain pieces for its rank.
    segments: list[tuple[int, int, int]] = []
    for o in range(outer):
        for p in range(len(split.parts)):
            for r in range(world):
                a, b = spans[r][p]
                segments.append((o * row + a, o * row + b, r))
    segments.sort()
    pieces: list[Piece] = []
    for a, b, r in segments:
        pieces.extend(_cut(file, begin + a, b - a, ToObject(objects[r])))
    return pieces


#: Small tensors held back to fill the gap before a large one, at most this many bytes
#: (the writer keeps their bytes until their place comes).
HOLD_BYTES = 16 << 20


class _Placer:
    """Offsets in one object: tensors of a chunk or more start on the chunk grid.

    Stores keep objects as 8 MiB parts; a range GET across two costs the server twice (see
    daemon/planner.py). A large tensor goes to the next grid line when the gap before it
    can be filled with small tensors held back from earlier, or costs at most 1/16 of the
    tensor in padding; small tensors otherwise follow at ``align``.
    """

    def __init__(self, obj: int, align: int, grid: int, out: list[OutSlice]) -> None:
        self.obj, self.align, self.grid, self.out = obj, align, grid, out
        self.cursor = 0
        self.held: list[OutSlice] = []
        self.held_bytes = 0

    def _put(self, s: OutSlice, offset: int) -> None:
        s.offset = offset
        self.cursor = offset + s.nbytes
        self.out.append(s)

    def place(self, shape: tuple[int, ...], nbytes: int) -> OutSlice:
        s = OutSlice(self.obj, 0, shape, nbytes)
        if nbytes < self.grid:
            self.held.append(s)
            self.held_bytes += nbytes
            if self.held_bytes > HOLD_BYTES:
                self.flush()
            return s
        line = align_up(self.cursor, self.grid)
        keep: list[OutSlice] = []
        for h in self.held:  # fill the gap, in order
            if align_up(self.cursor, self.align) + h.nbytes <= line:
                self._put(h, align_up(self.cursor, self.align))
                self.held_bytes -= h.nbytes
            else:
                keep.append(h)
        self.held = keep
        if line - align_up(self.cursor, self.align) <= nbytes // 16:
            self._put(s, line)
        else:
            self._put(s, align_up(self.cursor, self.align))
        return s

    def flush(self) -> None:
        for h in self.held:
            self._put(h, align_up(self.cursor, self.align))
        self.held.clear()
        self.held_bytes = 0


def make_layout(
    source: Source, plan: ShardPlan | None, world: int, align: int, grid: int
) -> Layout:
    objects = [DataObject(SHARED_NAME, 0, SHARED)]
    if plan is not None:
        objects += [DataObject(rank_object_name(r, world), 0, r) for r in range(world)]
    per_object: list[list[OutSlice]] = [[] for _ in objects]
    placers = [_Placer(i, align, grid, per_object[i]) for i in range(len(objects))]
    tensors: list[OutTensor] = []
    pieces: list[Piece] = []
    seen: dict[str, str] = {}

    for file, (obj, header) in enumerate(source.files):
        pos = 0
        for t in header.tensors:  # sorted by offset
            if t.name in seen:
                raise InvalidArtifact(
                    f"{source.ref.uri}: tensor {t.name!r} appears in both {seen[t.name]} "
                    f"and {obj.key}"
                )
            seen[t.name] = obj.key
            begin = header.data_start + t.begin
            if t.nbytes:  # non-empty tensors never overlap: begin >= pos
                pieces.extend(_cut(file, pos, begin - pos, None))
                pos = begin + t.nbytes
            split = plan.split_for(t.name, t.shape, world) if plan is not None else None
            size = DTYPE_SIZES[t.dtype]
            if split is None:
                slices = [placers[0].place(t.shape, t.nbytes)]
                pieces.extend(_cut(file, begin, t.nbytes, ToObject(0, slices[0])))
            else:
                # Rank objects are written strictly in order: no holding back there.
                shapes = [slice_shape(t.shape, split, world, r) for r in range(world)]
                slices = []
                for r, shape in enumerate(shapes):
                    slices.append(placers[r + 1].place(shape, math.prod(shape) * size))
                    placers[r + 1].flush()
                if t.nbytes:
                    pieces.extend(_split_pieces(
                        file, begin, t.shape, size, split, world, list(range(1, world + 1))
                    ))  # fmt: skip
            tensors.append(OutTensor(t.name, t.dtype, t.shape, split, slices))
        pieces.extend(_cut(file, pos, obj.size - pos, None))
    for placer in placers:
        placer.flush()
    sized = [dataclasses.replace(o, size=p.cursor) for o, p in zip(objects, placers, strict=True)]
    return Layout(sized, tensors, pieces, per_object)
