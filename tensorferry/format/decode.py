"""Decode and validate a prepared artifact's manifest. The manifest is untrusted input.

``decode_manifest`` checks types, the version, dtypes, shapes against byte counts, offsets
against object sizes, overlaps and every size against a limit, before the daemon plans (or
allocates) anything.
"""

from __future__ import annotations

import itertools
import re
import struct
from typing import Any

import msgpack

from tensorferry.errors import InvalidArtifact
from tensorferry.format.manifest import (
    CHECKSUM,
    DIGEST,
    FILE_NAME,
    FORMAT,
    MANIFEST_NAME,
    MAX_ALIGN,
    MAX_CHUNK,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MAX_OBJECT_BYTES,
    MAX_OBJECTS,
    MAX_TENSORS,
    MAX_WORLD_SIZE,
    MIN_ALIGN,
    MIN_CHUNK,
    OBJECT_NAME,
    RESERVED_PREFIX,
    SHA256,
    SHARED,
    VERSION,
    DataObject,
    FileRecord,
    Manifest,
    Slice,
    Split,
    TensorRecord,
    chunk_count,
    nbytes_of,
    slice_shape,
)
from tensorferry.format.safetensors import DTYPE_SIZES


class _Reader:
    """Typed access to the decoded document; every failure names the field."""

    def __init__(self, what: str) -> None:
        self.what = what

    def fail(self, where: str, problem: str) -> InvalidArtifact:
        return InvalidArtifact(
            f"{self.what} is not a valid tensorferry manifest: {where} {problem}; "
            "run `tensorferry prepare` again to rewrite the artifact"
        )

    def field(self, doc: dict[str, Any], key: str, where: str) -> Any:
        if key not in doc:
            raise self.fail(where, f"has no {key!r}")
        return doc[key]

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "is not a map")
        return value

    def integer(self, value: Any, where: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"is not an integer: {value!r:.80}")
        if not lo <= value <= hi:
            raise self.fail(where, f"is {value}, outside {lo}..{hi}")
        return value

    def text(self, value: Any, where: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
            raise self.fail(where, f"is not a string of 1..{MAX_NAME_CHARS} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(where, f"{value!r:.80} is not allowed here")
        return value

    def array(self, value: Any, where: str, limit: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "is not a list")
        if len(value) > limit:
            raise self.fail(where, f"has {len(value)} entries, more than {limit}")
        return value

    def shape(self, value: Any, where: str) -> tuple[int, ...]:
        dims = self.array(value, where, MAX_NDIM)
        return tuple(
            self.integer(d, f"{where}[{i}]", 0, MAX_OBJECT_BYTES) for i, d in enumerate(dims)
        )


def _header(r: _Reader, doc: dict[str, Any]) -> tuple[int, int, int, str]:
    fmt = r.field(doc, "format", "the manifest")
    if fmt != FORMAT:
        raise r.fail("the manifest", f"has format {fmt!r:.80}, expected {FORMAT!r}")
    version = r.field(doc, "version", "the manifest")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise InvalidArtifact(
            f"{r.what} has format version {version}, newer than this daemon reads "
            f"({VERSION}): upgrade tensorferry on this host, or prepare the artifact with "
            "the version the daemon runs"
        )
    r.integer(version, "version", VERSION, VERSION)
    if r.field(doc, "checksum", "the manifest") != CHECKSUM:
        raise r.fail("checksum", f"is not {CHECKSUM!r}")
    align = r.integer(r.field(doc, "align", "the manifest"), "align", MIN_ALIGN, MAX_ALIGN)
    if align & (align - 1):
        raise r.fail("align", f"{align} is not a power of two")
    chunk = r.integer(
        r.field(doc, "chunk_size", "the manifest"), "chunk_size", MIN_CHUNK, MAX_CHUNK
    )
    if chunk % align:
        raise r.fail("chunk_size", f"{chunk} is not a multiple of align {align}")
    world = r.integer(r.field(doc, "world_size", "the manifest"), "world_size", 1, MAX_WORLD_SIZE)
    digest = r.text(r.field(doc, "source_digest", "the manifest"), "source_digest", DIGEST)
    return align, chunk, world, digest


def _objects(r: _Reader, doc: dict[str, Any], world: int) -> tuple[DataObject, ...]:
    objects: list[DataObject] = []
    names: set[str] = set()
    for i, raw in enumerate(
        r.array(r.field(doc, "objects", "the manifest"), "objects", MAX_OBJECTS)
    ):
        where = f"objects[{i}]"
        o = r.mapping(raw, where)
        name = r.text(r.field(o, "name", where), f"{where}.name", OBJECT_NAME)
        if name == MANIFEST_NAME or name in names:
            raise r.fail(f"{where}.name", f"{name!r} is the manifest's or repeats")
        names.add(name)
        size = r.integer(r.field(o, "size", where), f"{where}.size", 0, MAX_OBJECT_BYTES)
        rank = r.integer(r.field(o, "rank", where), f"{where}.rank", SHARED, world - 1)
        objects.append(DataObject(name, size, rank))
    if not objects:
        raise r.fail("objects", "is empty")
    return tuple(objects)


def _slice(
    r: _Reader, raw: Any, where: str, dtype: str, want_shape: tuple[int, ...], want_rank: int,
    m: tuple[int, int, tuple[DataObject, ...]],
) -> Slice:  # fmt: skip
    align, chunk, objects = m
    s = r.mapping(raw, where)
    index = r.integer(r.field(s, "object", where), f"{where}.object", 0, len(objects) - 1)
    obj = objects[index]
    if obj.rank != want_rank:
        raise r.fail(f"{where}.object", f"is {obj.name}, which holds rank {obj.rank}'s bytes")
    shape = r.shape(r.field(s, "shape", where), f"{where}.shape")
    if shape != want_shape:
        raise r.fail(f"{where}.shape", f"is {list(shape)}, expected {list(want_shape)}")
    nbytes = r.integer(r.field(s, "nbytes", where), f"{where}.nbytes", 0, obj.size)
    if nbytes != nbytes_of(dtype, shape):
        raise r.fail(f"{where}.nbytes", f"is {nbytes} but dtype {dtype} and shape "
                     f"{list(shape)} need {nbytes_of(dtype, shape)}")  # fmt: skip
    offset = r.integer(r.field(s, "offset", where), f"{where}.offset", 0, obj.size - nbytes)
    if offset % align:
        raise r.fail(f"{where}.offset", f"{offset} is not a multiple of align {align}")
    crc = r.field(s, "crc32c", where)
    count = chunk_count(nbytes, chunk)
    if not isinstance(crc, bytes) or len(crc) != 4 * count:
        raise r.fail(f"{where}.crc32c", f"must be {count} little-endian uint32 values")
    return Slice(index, offset, shape, nbytes, struct.unpack(f"<{count}I", crc))


def _split(r: _Reader, raw: Any, where: str, shape: tuple[int, ...]) -> Split | None:
    if raw is None:
        return None
    s = r.mapping(raw, where)
    dim = r.integer(r.field(s, "dim", where), f"{where}.dim", 0, len(shape) - 1)
    plist = r.array(r.field(s, "parts", where), f"{where}.parts", MAX_WORLD_SIZE)
    parts = tuple(r.integer(p, f"{where}.parts[{i}]", 0, shape[dim]) for i, p in enumerate(plist))
    if not parts or sum(parts) != shape[dim]:
        raise r.fail(f"{where}.parts", f"must add up to the size of dim {dim}, {shape[dim]}")
    return Split(dim, parts)


def _tensors(
    r: _Reader, doc: dict[str, Any], align: int, chunk: int, world: int,
    objects: tuple[DataObject, ...],
) -> tuple[TensorRecord, ...]:  # fmt: skip
    tensors: list[TensorRecord] = []
    names: set[str] = set()
    raws = r.array(r.field(doc, "tensors", "the manifest"), "tensors", MAX_TENSORS)
    for i, raw in enumerate(raws):
        where = f"tensors[{i}]"
        t = r.mapping(raw, where)
        name = r.text(r.field(t, "name", where), f"{where}.name")
        if name in names:
            raise r.fail(f"{where}.name", f"{name!r:.80} repeats")
        names.add(name)
        where = f"tensor {name!r:.80}"
        dtype = r.field(t, "dtype", where)
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise r.fail(f"{where}.dtype", f"{dtype!r:.40} is not a safetensors dtype")
        shape = r.shape(r.field(t, "shape", where), f"{where}.shape")
        if nbytes_of(dtype, shape) > MAX_OBJECT_BYTES:
            raise r.fail(f"{where}.shape", f"{list(shape)} is too large")
        split = _split(r, r.field(t, "split", where), f"{where}.split", shape)
        ranks = [SHARED] if split is None else list(range(world))
        slices = r.array(r.field(t, "slices", where), f"{where}.slices", MAX_WORLD_SIZE)
        if len(slices) != len(ranks):
            raise r.fail(f"{where}.slices", f"has {len(slices)} entries, expected {len(ranks)}")
        tensors.append(
            TensorRecord(name, dtype, shape, split, tuple(
                _slice(
                    r, raw_slice, f"{where}.slices[{k}]", dtype,
                    shape if split is None else slice_shape(shape, split, world, k),
                    rank, (align, chunk, objects),
                )
                for k, (raw_slice, rank) in enumerate(zip(slices, ranks, strict=True))
            ))
        )  # fmt: skip
    if not tensors:
        raise r.fail("tensors", "is empty")
    return tuple(tensors)


def _check_overlaps(r: _Reader, m: Manifest) -> None:
    spans = sorted(
        (s.object, s.offset, s.offset + s.nbytes, t.name)
        for t in m.tensors
        for s in t.slices
        if s.nbytes
    )
    for (obj_a, _, end_a, name_a), (obj_b, begin_b, _, name_b) in itertools.pairwise(spans):
        if obj_a == obj_b and begin_b < end_a:
            raise r.fail(f"tensors {name_a!r:.80} and {name_b!r:.80}", "overlap")


def _files(r: _Reader, doc: dict[str, Any]) -> tuple[FileRecord, ...]:
    files: list[FileRecord] = []
    for i, raw in enumerate(r.array(r.field(doc, "files", "the manifest"), "files", MAX_FILES)):
        where = f"files[{i}]"
        f = r.mapping(raw, where)
        name = r.text(r.field(f, "name", where), f"{where}.name", FILE_NAME)
        if name.startswith(RESERVED_PREFIX) or name in (".", ".."):
            raise r.fail(f"{where}.name", f"{name!r} is reserved")
        size = r.integer(r.field(f, "size", where), f"{where}.size", 0, MAX_OBJECT_BYTES)
        digest = r.text(r.field(f, "sha256", where), f"{where}.sha256", SHA256)
        files.append(FileRecord(name, size, digest))
    return tuple(files)


def decode_manifest(raw: bytes, what: str) -> Manifest:
    """Parse and validate manifest bytes; ``what`` names the manifest in messages."""
    r = _Reader(what)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise r.fail("the manifest", f"has {len(raw)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, max_str_len=1 << 16,
            max_bin_len=MAX_MANIFEST_BYTES, max_array_len=MAX_TENSORS, max_map_len=64,
            max_ext_len=0,
        )  # fmt: skip
    except (ValueError, msgpack.UnpackException) as exc:
        raise r.fail("the manifest", f"is not msgpack ({type(exc).__name__})") from None
    doc = r.mapping(doc, "the manifest")
    align, chunk, world, digest = _header(r, doc)
    objects = _objects(r, doc, world)
    tensors = _tensors(r, doc, align, chunk, world, objects)
    m = Manifest(digest, chunk, align, world, objects, tensors, _files(r, doc))
    _check_overlaps(r, m)
    return m
