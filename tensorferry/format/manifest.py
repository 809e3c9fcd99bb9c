"""The prepared-artifact manifest (docs/format.md): its data model, limits and encoding.

``tensorferry.format.decode`` reads it back, validating every field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct

import msgpack

from tensorferry.format.safetensors import DTYPE_SIZES

MANIFEST_NAME = "tensorferry.manifest.msgpack"
FORMAT = "tensorferry.daemon.planner_prepared"
VERSION = 1
CHECKSUM = "crc32c"
#: The manifest, data objects and nothing else of ours share this name prefix.
RESERVED_PREFIX = "tensorferry."
SHARED = -1  # DataObject.rank of the object every rank reads

MAX_MANIFEST_BYTES = 256 << 20
MAX_TENSORS = 1_000_000
MAX_OBJECTS = 4096
MAX_FILES = 10_000
MAX_WORLD_SIZE = 1024
MAX_NDIM = 32
MAX_NAME_CHARS = 4096
MAX_OBJECT_BYTES = 1 << 43  # 8 TiB; S3 stops at 5 TiB
MIN_ALIGN, MAX_ALIGN = 8, 1 << 20
MIN_CHUNK, MAX_CHUNK = 4096, 1 << 30

OBJECT_NAME = re.compile(r"tensorferry\.[A-Za-z0-9._-]{1,200}")
FILE_NAME = re.compile(r"[A-Za-z0-9._+@=,-][A-Za-z0-9._+@=, -]{0,254}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True, slots=True)
class DataObject:
    name: str
    size: int
    rank: int  # SHARED, or the one rank whose slices it holds


@dataclasses.dataclass(frozen=True, slots=True)
class Slice:
    object: int  # index into Manifest.objects
    offset: int
    shape: tuple[int, ...]
    nbytes: int
    crc: tuple[int, ...]  # chunk i covers [offset + i*chunk_size, ...) clipped to nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class Split:
    dim: int
    parts: tuple[int, ...]  # sub-sizes along dim (one entry unless the weight is fused)


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]  # the whole tensor's
    split: Split | None  # None: replicated, one slice
    slices: tuple[Slice, ...]  # one, or one per rank


@dataclasses.dataclass(frozen=True, slots=True)
class FileRecord:
    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    source_digest: str
    chunk_size: int
    align: int
    world_size: int  # ranks the shards were cut for; 1 without a shard plan
    objects: tuple[DataObject, ...]
    tensors: tuple[TensorRecord, ...]
    files: tuple[FileRecord, ...]


def valid_file_name(name: str) -> bool:
    """Names a manifest may list as copied files (and so a daemon may serve)."""
    return bool(FILE_NAME.fullmatch(name)) and not name.startswith(RESERVED_PREFIX)


def balanced(size: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of ``size``: the first ``size % world_size`` ranks get one more
    (torch.tensor_split's rule)."""
    return size // world_size + (1 if rank < size % world_size else 0)


def slice_shape(
    shape: tuple[int, ...], split: Split, world_size: int, rank: int
) -> tuple[int, ...]:
    size = sum(balanced(p, world_size, rank) for p in split.parts)
    return (*shape[: split.dim], size, *shape[split.dim + 1 :])


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def chunk_count(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


def encode_manifest(m: Manifest) -> bytes:
    """Deterministic bytes: the same artifact always gives the same manifest."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "checksum": CHECKSUM,
        "source_digest": m.source_digest,
        "chunk_size": m.chunk_size,
        "align": m.align,
        "world_size": m.world_size,
        "objects": [{"name": o.name, "size": o.size, "rank": o.rank} for o in m.objects],
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "split": None
                if t.split is None
                else {"dim": t.split.dim, "parts": list(t.split.parts)},
                "slices": [
                    {
                        "object": s.object,
                        "offset": s.offset,
                        "shape": list(s.shape),
                        "nbytes": s.nbytes,
                        "crc32c": struct.pack(f"<{len(s.crc)}I", *s.crc),
                    }
                    for s in t.slices
                ],
            }
            for t in m.tensors
        ],
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in m.files],
    }
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]
