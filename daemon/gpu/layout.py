"""Where a plan's bytes go on a GPU: 256-byte-aligned tensors, and the copies per ring slot.

The planner lays tensors out as their files do (a run of touching tensors lands verbatim,
so a tensor keeps its file offset modulo 4 KiB). That is what a CPU arena wants, since the
bytes land in place; but safetensors packs tensors back to back, so their offsets are only
multiples of their item size, and GPU kernels want more (vectorised loads, cuBLAS, TMA).
On the GPU path the bytes pass through a ring slot anyway, so each slot's H2D copies can
scatter its tensors to aligned offsets for free. Tensors keep their plan order; a tensor
whose offset keeps the previous tensor's displacement and is aligned keeps it, so
already-aligned plans (prepared artifacts, most large weights) copy as one piece per slot.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools

from tensorferry.daemon.planner import Plan, PlannedTensor, Range, align_up
from tensorferry.errors import FailedPrecondition, InternalError

#: Every tensor offset in a GPU arena is a multiple of this (cudaMalloc itself gives 256).
GPU_ALIGN = 256
#: Arena sizes are rounded to the allocation granularity: the pages of an IPC-exported
#: allocation must not hold another allocation's bytes.
ARENA_GRANULARITY = 2 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    src: int  # offset in the ring slot
    dst: int  # offset in the GPU arena
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One range GET into one ring slot, and the H2D copies that place its bytes."""

    range: Range
    pieces: tuple[Piece, ...]


def place_tensors(tensors: tuple[PlannedTensor, ...]) -> dict[str, int]:
    """GPU offset of each tensor (by name), aligned, in the plan's order."""
    offsets: dict[str, int] = {}
    cursor = 0
    delta: int | None = None
    for t in sorted(tensors, key=lambda t: (t.offset, t.name)):
        keep = None if delta is None else t.offset + delta
        if keep is None or keep < cursor or keep % GPU_ALIGN:
            keep = align_up(cursor, GPU_ALIGN)
            delta = keep - t.offset
        offsets[t.name] = keep
        cursor = keep + t.nbytes
    return offsets


def _split(r: Range, slot_size: int) -> list[Range]:
    """Ranges that fit a slot; a checksummed range splits between its chunks (the padding
    between two chunks holds no tensor bytes and may be left out)."""
    if r.length <= slot_size:
        return [r]
    if not r.checks:
        return [
            Range(r.obj, r.start + pos, min(slot_size, r.length - pos), r.arena_offset + pos)
            for pos in range(0, r.length, slot_size)
        ]
    parts: list[Range] = []
    group: list[tuple[int, int, int]] = []

    def flush() -> None:
        begin, end = group[0][0], group[-1][0] + group[-1][1]
        checks = tuple((o - begin, n, c) for o, n, c in group)
        parts.append(Range(r.obj, r.start + begin, end - begin, r.arena_offset + begin, checks))

    for chunk in r.checks:
        offset, length, _ = chunk
        if length > slot_size:
            raise FailedPrecondition(
                f"{r.obj.key}: its checksummed chunks have {length} bytes, more than a ring "
                f"slot ({slot_size} bytes); raise [cuda] slot_size to at least {length}"
            )
        if group and offset + length - group[0][0] > slot_size:
            flush()
            group = []
        group.append(chunk)
    flush()
    return parts


def _pieces(
    r: Range, tensors: list[tuple[int, int, int]], starts: list[int]
) -> tuple[list[Piece], int]:
    """Copies that carry the tensor bytes found in ``r`` to the GPU, and how many tensor
    bytes they carry. ``tensors``: (staging offset, nbytes, GPU offset), sorted."""
    lo, hi = r.arena_offset, r.arena_offset + r.length
    pieces: list[Piece] = []
    carried = 0
    # Tensors are sorted by start and do not overlap: only the one before ``lo`` can reach in.
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    for start, nbytes, gpu in tensors[i:]:
        if start >= hi:
            break
        a, b = max(start, lo), min(start + nbytes, hi)
        if a >= b:
            continue
        carried += b - a
        piece = Piece(a - lo, gpu + a - start, b - a)
        last = pieces[-1] if pieces else None
        # Same displacement as the previous piece: copy the gap too (its GPU side is
        # unused padding), one call instead of two.
        if last is not None and last.dst - last.src == piece.dst - piece.src:
            pieces[-1] = Piece(last.src, last.dst, piece.src + piece.nbytes - last.src)
        else:
            pieces.append(piece)
    return pieces, carried


def gpu_layout(plan: Plan, slot_size: int) -> tuple[Plan, list[Job]]:
    """The plan as a GPU arena holds it, and the slot-sized jobs that fill it."""
    offsets = place_tensors(plan.tensors)
    placed = tuple(
        PlannedTensor(t.name, t.dtype, t.shape, offsets[t.name], t.nbytes) for t in plan.tensors
    )
    end = max((t.offset + t.nbytes for t in placed), default=0)
    spans = sorted((t.offset, t.nbytes, offsets[t.name]) for t in plan.tensors if t.nbytes)
    for (s0, n0, _), (s1, _, _) in itertools.pairwise(spans):
        if s0 + n0 > s1:
            raise InternalError(f"planned tensors overlap at arena offset {s1}")
    starts = [s for s, _, _ in spans]
    jobs: list[Job] = []
    copied = 0
    for r in plan.ranges:
        for part in _split(r, slot_size):
            pieces, carried = _pieces(part, spans, starts)
            copied += carried
            jobs.append(Job(part, tuple(pieces)))
    if copied != plan.tensor_bytes:
        raise InternalError(f"the plan's ranges cover {copied} of {plan.tensor_bytes} tensor bytes")
    size = align_up(max(end, 1), ARENA_GRANULARITY)
    return Plan(placed, tuple(j.range for j in jobs), size), jobs
