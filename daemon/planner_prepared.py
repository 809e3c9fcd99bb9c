"""Loads of prepared artifacts (``tensorferry prepare``): read the manifest, plan the ranges.

A prepared artifact is recognised by its manifest object. Its plan fetches only the
selected tensors' slices for one rank; each range ends on chunk boundaries and carries the
chunks' checksums, which the fetch stage verifies as the bytes land.
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
from typing import TYPE_CHECKING

from tensorferry.daemon.fetch.reads import Reads
from tensorferry.daemon.planner import (
    ARENA_ALIGN,
    STEP,
    Plan,
    PlannedTensor,
    Range,
    align_up,
    selector,
)
from tensorferry.daemon.steps import Steps, at_once, stepwise
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.errors import InvalidArtifact, InvalidRequest
from tensorferry.format.decode import decode_manifest
from tensorferry.format.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    Slice,
)

if TYPE_CHECKING:
    from tensorferry.daemon.fetch.retries import FetchPolicy


def is_prepared(listing: list[ObjectInfo]) -> bool:
    return any(o.key == MANIFEST_NAME for o in listing)


def check_unsharded(uri: str, world_size: int, device: str = "cpu") -> None:
    """Plain safetensors have no shard plan: a rank would get everything, which is not
    what a caller that passes a world size means. On a GPU that is the whole model on
    every rank's GPU (and N fetches), so the refusal names the shared CPU arena."""
    if world_size > 1 and device != "cpu":
        raise InvalidRequest(
            f"{uri} is plain safetensors, and a GPU takes only its own rank's share of a "
            f"model: world_size={world_size} on a GPU needs an artifact made by "
            f"`tensorferry prepare SRC DST --shard-plan FILE --tp {world_size}`; or load it "
            'into the CPU arena (device "cpu", the default): one copy in host memory that '
            "every rank attaches to"
        )
    if world_size > 1:
        raise InvalidRequest(
            f"{uri} is plain safetensors: rank/world_size need an artifact made by "
            f"`tensorferry prepare SRC DST --shard-plan FILE --tp {world_size}`; "
            "load the whole model without rank/world_size"
        )


async def read_manifest(
    store: Store, listing: list[ObjectInfo], policy: FetchPolicy | None = None
) -> tuple[Manifest, tuple[ObjectInfo, ...]]:
    """The validated manifest and the store's object for each of its data objects; its
    read is retried under ``policy`` as data ranges are."""
    by_name = {o.key: o for o in listing}
    obj = by_name[MANIFEST_NAME]
    what = store.describe(obj)
    if obj.size > MAX_MANIFEST_BYTES:
        raise InvalidArtifact(
            f"{what} has {obj.size} bytes, more than a manifest may have "
            f"({MAX_MANIFEST_BYTES}); it is not a tensorferry manifest"
        )
    raw = await Reads(store, policy).read(obj, 0, obj.size) if obj.size else b""
    # Off the event loop: a manifest of 200k tensors decodes for seconds.
    manifest = await asyncio.to_thread(decode_manifest, raw, what)
    found: list[ObjectInfo] = []
    for data in manifest.objects:
        stored = by_name.get(data.name)
        if stored is None or stored.size != data.size:
            has = "is missing" if stored is None else f"has {stored.size} bytes"
            raise InvalidArtifact(
                f"{what} names {data.name} of {data.size} bytes, but it {has}: the artifact "
                "is incomplete or was overwritten; run `tensorferry prepare` again"
            )
        found.append(stored)
    return manifest, tuple(found)


def _check_rank(uri: str, m: Manifest, rank: int, world_size: int) -> None:
    if max(world_size, 1) == m.world_size:
        return
    if m.world_size == 1:
        raise InvalidRequest(
            f"{uri} was prepared without a shard plan: load it without rank/world_size, or "
            f"prepare it with --shard-plan FILE --tp {world_size}"
        )
    raise InvalidRequest(
        f"{uri} was prepared for tensor parallelism {m.world_size}: load it with "
        f"world_size={m.world_size} and a rank 0..{m.world_size - 1}"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Want:
    name: str
    dtype: str
    slice: Slice


def _runs(wanted: list[_Want], align: int) -> list[list[_Want]]:
    """Slices that follow each other in their object with only alignment padding between
    them: one run lands verbatim, padding included, so it may share ranges."""
    runs: list[list[_Want]] = []
    for w in sorted(wanted, key=lambda w: (w.slice.object, w.slice.offset, w.slice.nbytes)):
        s = w.slice
        if runs:
            last = runs[-1][-1].slice
            if last.object == s.object and s.offset == align_up(last.offset + last.nbytes, align):
                runs[-1].append(w)
                continue
        runs.append([w])
    return runs


def _ranges(
    obj: ObjectInfo, run: list[_Want], base: int, chunk_size: int, limit: int
) -> list[Range]:
    """Cut a run into ranges of whole chunks, up to ``limit`` bytes each."""
    start0 = run[0].slice.offset
    ranges: list[Range] = []
    begin = end = -1
    checks: list[tuple[int, int, int]] = []
    for w in run:
        s = w.slice
        for i, crc in enumerate(s.crc):
            c_begin = s.offset + i * chunk_size
            c_end = min(c_begin + chunk_size, s.offset + s.nbytes)
            if begin >= 0 and c_end - begin > limit:
                ranges.append(Range(obj, begin, end - begin, base + begin - start0, tuple(checks)))
                begin = -1
            if begin < 0:
                begin, checks = c_begin, []
            checks.append((c_begin - begin, c_end - c_begin, crc))
            end = c_end
    if begin >= 0:
        ranges.append(Range(obj, begin, end - begin, base + begin - start0, tuple(checks)))
    return ranges


def plan_prepared(
    manifest: Manifest, objects: tuple[ObjectInfo, ...], uri: str, *, chunk_size: int,
    select: tuple[str, ...] = (), rank: int = 0, world_size: int = 0,
) -> Plan:  # fmt: skip
    """Lay out rank ``rank``'s slices of the selected tensors and their ranges."""
    return at_once(_plan_steps(manifest, objects, uri, chunk_size, select, rank, world_size))


async def plan_manifest(
    manifest: Manifest, objects: tuple[ObjectInfo, ...], uri: str, *, chunk_size: int,
    select: tuple[str, ...] = (), rank: int = 0, world_size: int = 0,
) -> Plan:  # fmt: skip
    """``plan_prepared`` on the event loop, in steps (see ``planner.plan_load``)."""
    return await stepwise(_plan_steps(manifest, objects, uri, chunk_size, select, rank, world_size))


def _plan_steps(
    manifest: Manifest, objects: tuple[ObjectInfo, ...], uri: str, chunk_size: int,
    select: tuple[str, ...], rank: int, world_size: int,
) -> Steps[Plan]:  # fmt: skip
    _check_rank(uri, manifest, rank, world_size)
    wanted = selector(select)
    chosen: list[_Want] = []
    for i, t in enumerate(manifest.tensors, 1):
        if wanted(t.name):
            chosen.append(
                _Want(t.name, t.dtype, t.slices[0] if t.split is None else t.slices[rank])
            )
        if i % STEP == 0:
            yield
    for pattern in select:
        matches = selector((pattern,))
        if not any(matches(w.name) for w in chosen):
            raise InvalidRequest(f"{uri}: selection {pattern!r} matches no tensor")
        yield
    # Slice offsets are multiples of align, so a run based at a multiple keeps them aligned.
    base_align = max(manifest.align, ARENA_ALIGN)
    limit = max(chunk_size, manifest.chunk_size)
    tensors: list[PlannedTensor] = []
    ranges: list[Range] = []
    cursor = 0
    runs = _runs(chosen, manifest.align)
    yield
    for run in runs:
        base = align_up(cursor, base_align)
        start0 = run[0].slice.offset
        for w in run:
            offset = base + w.slice.offset - start0
            tensors.append(PlannedTensor(w.name, w.dtype, w.slice.shape, offset, w.slice.nbytes))
            if len(tensors) % STEP == 0:
                yield
        obj = objects[run[0].slice.object]
        ranges.extend(_ranges(obj, run, base, manifest.chunk_size, limit))
        last = run[-1].slice
        cursor = base + last.offset + last.nbytes - start0
    yield
    tensors.sort(key=operator.attrgetter("name"))
    return Plan(tuple(tensors), tuple(ranges), align_up(max(cursor, 1)))


async def plan_prepared_load(
    store: Store, uri: str, listing: list[ObjectInfo], *, chunk_size: int,
    select: tuple[str, ...] = (), rank: int = 0, world_size: int = 0,
) -> Plan:  # fmt: skip
    manifest, objects = await read_manifest(store, listing)
    return await plan_manifest(
        manifest, objects, uri, chunk_size=chunk_size, select=select, rank=rank,
        world_size=world_size,
    )  # fmt: skip
