"""`tensorferry prepare SRC DST`: stream a safetensors model into a prepared artifact.

Order of writes, so that a run killed at any point leaves nothing a daemon would load and
a re-run gives the same artifact: drop the old manifest; remove partial files and abort
incomplete multipart uploads of earlier runs; write the data objects and copied files;
delete data objects the new manifest does not name; write the manifest last.

Memory stays bounded: ``READ_AHEAD`` source pieces of at most 8 MiB, ``PARTS_IN_FLIGHT``
upload parts, and one part being filled per output object.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable

from tensorferry.daemon.planner_prepared import is_prepared
from tensorferry.daemon.source import INDEX_NAME, Source, list_source, parse_uri, read_source
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.tasks import task_group
from tensorferry.errors import InvalidRequest, StoreUnavailable
from tensorferry.format.decode import decode_manifest
from tensorferry.format.manifest import (
    MANIFEST_NAME,
    RESERVED_PREFIX,
    FileRecord,
    Manifest,
    Slice,
    TensorRecord,
    encode_manifest,
    valid_file_name,
)
from tensorferry.prepare.builder import ObjectBuilder
from tensorferry.prepare.layout import Layout, Piece, make_layout
from tensorferry.prepare.outputs import Destination, ObjectWriter
from tensorferry.prepare.shardplan import ShardPlan

READ_AHEAD = 8
PARTS_IN_FLIGHT = 8
READ_ATTEMPTS = 4
COPY_BLOCK = 8 << 20
#: Other weight formats beside the safetensors: not copied.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
                    ".npz", ".ot", ".tflite", ".index.json")  # fmt: skip
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    src: str
    dst: str
    chunk_size: int = 8 << 20
    align: int = 4096
    plan: ShardPlan | None = None
    world_size: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    manifest: Manifest
    manifest_bytes: bytes
    dst: str
    source_bytes: int
    seconds: float
    skipped: tuple[str, ...]  # source files not copied
    unmatched_rules: tuple[int, ...]  # shard rules that matched no tensor
    cleaned: int  # partial files / incomplete uploads of earlier runs removed


async def _read(store: Store, obj: ObjectInfo, start: int, length: int) -> bytearray:
    buf = bytearray(length)
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            await store.read_into(obj, start, memoryview(buf))
            return buf
        except StoreUnavailable:
            if attempt == READ_ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * 2**attempt)
    raise AssertionError("not reached")


class _Uploads:
    """Parts in flight, bounded: submitting waits while the bound is reached."""

    def __init__(self, tg: asyncio.TaskGroup) -> None:
        self.tg = tg
        self.slots = asyncio.Semaphore(PARTS_IN_FLIGHT)

    async def submit(self, builder: ObjectBuilder, writer: ObjectWriter) -> None:
        for number, data in builder.take_ready():
            await self.slots.acquire()
            self.tg.create_task(self._send(writer, number, data))

    async def _send(self, writer: ObjectWriter, number: int, data: bytes) -> None:
        try:
            await writer.part(number, data)
        finally:
            self.slots.release()


async def _stream(
    store: Store, source: Source, layout: Layout, builders: list[ObjectBuilder],
    writers: list[ObjectWriter], progress: Callable[[int], None],
) -> list[str]:  # fmt: skip
    """Every source file once, front to back, into the builders; the files' sha256."""
    hashes = [hashlib.sha256() for _ in source.files]
    async with task_group() as tg:
        uploads = _Uploads(tg)
        todo = iter(layout.pieces)
        reads: collections.deque[tuple[Piece, asyncio.Task[bytearray]]] = collections.deque()

        def read_next() -> None:
            piece = next(todo, None)
            if piece is not None:
                obj = source.files[piece.file][0]
                reads.append((piece, tg.create_task(_read(store, obj, piece.start, piece.length))))

        for _ in range(READ_AHEAD):
            read_next()
        while reads:
            piece, task = reads.popleft()
            data = memoryview(await task)
            read_next()
            # sha256 and the routing (crc32c, copies) both release the GIL: two cores.
            jobs = [asyncio.to_thread(hashes[piece.file].update, data)]
            if piece.route is not None:
                jobs.append(asyncio.to_thread(piece.route.apply, data, builders))
            await asyncio.gather(*jobs)
            progress(piece.length)
            for builder, writer in zip(builders, writers, strict=True):
                await uploads.submit(builder, writer)
        for builder, writer in zip(builders, writers, strict=True):
            builder.finish()
            await uploads.submit(builder, writer)
    return [h.hexdigest() for h in hashes]


async def _copy(store: Store, obj: ObjectInfo, dest: Destination) -> str:
    """Copy one small file (config, tokenizer) block by block; its sha256."""
    digest = hashlib.sha256()
    part = max(COPY_BLOCK, -(-obj.size // 9_999))
    writer = await dest.open(obj.key, obj.size, part)
    try:
        for number, start in enumerate(range(0, obj.size, part), 1):
            data = await _read(store, obj, start, min(part, obj.size - start))
            digest.update(data)
            await writer.part(number, bytes(data))
        await writer.complete()
    except BaseException:
        await writer.abort()
        raise
    return digest.hexdigest()


def _partition(source: Source) -> tuple[list[ObjectInfo], list[ObjectInfo], list[str]]:
    """Source files besides the weights: (to copy, to hash only, skipped)."""
    copy, hash_only, skipped = [], [], []
    for obj in source.others:
        if obj.key == INDEX_NAME:
            hash_only.append(obj)
        elif obj.key.endswith(SKIPPED_SUFFIXES) or not valid_file_name(obj.key):
            skipped.append(obj.key)
        else:
            copy.append(obj)
    return copy, hash_only, skipped


def source_digest(entries: list[tuple[str, int, str]]) -> str:
    digest = hashlib.sha256()
    for name, size, sha in sorted(entries):
        digest.update(f"{name}\0{size}\0{sha}\n".encode())
    return "sha256:" + digest.hexdigest()


def _manifest(o: Options, layout: Layout, digest: str, files: list[FileRecord]) -> Manifest:
    tensors = tuple(
        TensorRecord(t.name, t.dtype, t.shape, t.split, tuple(
            Slice(s.object, s.offset, s.shape, s.nbytes, tuple(s.crc)) for s in t.slices
        ))
        for t in layout.tensors
    )  # fmt: skip
    return Manifest(
        digest, o.chunk_size, o.align, o.world_size, tuple(layout.objects), tensors,
        tuple(sorted(files, key=lambda f: f.name)),
    )  # fmt: skip


async def _write_data(
    store: Store, source: Source, layout: Layout, dest: Destination, o: Options,
    progress: Callable[[int], None],
) -> list[str]:  # fmt: skip
    builders = [
        ObjectBuilder(obj.size, slices, o.chunk_size)
        for obj, slices in zip(layout.objects, layout.slices, strict=True)
    ]
    writers: list[ObjectWriter] = []
    try:
        for obj, builder in zip(layout.objects, builders, strict=True):
            writers.append(await dest.open(obj.name, obj.size, builder.part_size))
        hashes = await _stream(store, source, layout, builders, writers, progress)
        for writer in writers:
            await writer.complete()
    except BaseException:
        for writer in writers:
            await writer.abort()
        raise
    return hashes


async def run_prepare(
    o: Options, store: Store, dest: Destination, progress: ProgressFn | None = None
) -> Result:
    t0 = time.monotonic()
    ref = parse_uri(o.src)
    listing = await list_source(ref, store)
    if is_prepared(listing):
        raise InvalidRequest(f"{o.src} is already a prepared artifact: give the safetensors")
    source = await read_source(ref, store, listing)
    layout = make_layout(source, o.plan, o.world_size, o.align, o.chunk_size)
    copy, hash_only, skipped = _partition(source)
    total = layout.source_bytes + sum(f.size for f in copy + hash_only)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("prepare", done, total)

    await dest.delete(MANIFEST_NAME)
    cleaned = await dest.clean_partial()
    hashes = await _write_data(store, source, layout, dest, o, advance)
    entries = [(obj.key, obj.size, h) for (obj, _), h in zip(source.files, hashes, strict=True)]
    files: list[FileRecord] = []
    for obj in copy + hash_only:
        if obj in copy:
            sha = await _copy(store, obj, dest)
            files.append(FileRecord(obj.key, obj.size, sha))
        else:
            data = await store.read(obj, 0, obj.size) if obj.size else b""
            sha = hashlib.sha256(data).hexdigest()
        entries.append((obj.key, obj.size, sha))
        advance(obj.size)
    keep = {obj.name for obj in layout.objects}
    for name in await dest.names():
        if name.startswith(RESERVED_PREFIX) and name != MANIFEST_NAME and name not in keep:
            await dest.delete(name)
    manifest = _manifest(o, layout, source_digest(entries), files)
    raw = encode_manifest(manifest)
    decode_manifest(raw, f"{dest.uri}{MANIFEST_NAME}")  # what the daemon will check
    await dest.put(MANIFEST_NAME, raw)
    matched = {r.number for t in layout.tensors if o.plan and (r := o.plan.rule_for(t.name))}
    unmatched = tuple(r.number for r in o.plan.rules if r.number not in matched) if o.plan else ()
    return Result(
        manifest=manifest, manifest_bytes=raw, dst=dest.uri, source_bytes=total,
        seconds=time.monotonic() - t0, skipped=tuple(skipped), unmatched_rules=unmatched,
        cleaned=cleaned,
    )  # fmt: skip
