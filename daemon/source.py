"""Sources: parse a URI, check it against the allowlist, list its files, read headers.

Every check that can refuse a load runs here, before the store sees a data request and
before any arena exists.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tensorferry.daemon.config.settings import DEFAULT_MAX_TENSORS, Settings, normalize_allow_entry
from tensorferry.daemon.fetch.reads import Reads
from tensorferry.daemon.offload import OFFLOAD_BYTES, in_child
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.tasks import task_group
from tensorferry.errors import (
    InvalidArtifact,
    InvalidRequest,
    SourceNotAllowed,
    SourceNotFound,
    quote,
)
from tensorferry.format.index import INDEX_NAME as INDEX_NAME  # re-exported
from tensorferry.format.index import index_shards
from tensorferry.format.manifest import RESERVED_PREFIX
from tensorferry.format.safetensors import (
    HEADER_PROBE_BYTES,
    Header,
    header_length,
    parse_header,
    too_many_tensors,
)

if TYPE_CHECKING:
    from tensorferry.daemon.fetch.retries import FetchPolicy

MAX_INDEX_BYTES = 64 << 20
#: Linux's limits on a path (PATH_MAX less its final NUL) and on one name in it.
PATH_MAX = 4095
NAME_MAX = 255
#: S3's limit on a key.
MAX_KEY_BYTES = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class SourceRef:
    uri: str  # normalised: s3://bucket/prefix/ , s3://bucket/prefix/x.safetensors , /abs/dir/
    scheme: str  # "s3" or "local"
    bucket: str = ""
    prefix: str = ""  # key prefix ending in "/" (or "")
    single: str | None = None  # one file's name under prefix
    path: Path | None = None


def parse_uri(uri: str) -> SourceRef:
    if not uri:
        raise InvalidRequest("no source URI given: pass s3://bucket/prefix/ or a directory")
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        size = len(key.encode(errors="surrogatepass"))
        if size > MAX_KEY_BYTES:
            raise InvalidRequest(
                f"{quote(uri)} is not a valid s3://bucket/prefix/ URI: its key has {size} "
                f"bytes; the limit is {MAX_KEY_BYTES}"
            )
        parts = [p for p in key.split("/") if p]
        if not bucket or any(p in (".", "..") for p in parts) or "//" in key:
            raise InvalidRequest(f"{quote(uri)} is not a valid s3://bucket/prefix/ URI")
        single = None
        if parts and parts[-1].endswith(".safetensors"):
            single = parts.pop()
        prefix = "".join(p + "/" for p in parts)
        return SourceRef(f"s3://{bucket}/{prefix}{single or ''}", "s3", bucket, prefix, single)
    raw = uri[7:] if uri.startswith("file://") else uri
    if "://" in raw or not raw.startswith("/"):
        raise InvalidRequest(
            f"{quote(uri)} is not a supported source: use s3://bucket/prefix/ or an absolute "
            "directory path"
        )
    _check_path(uri, raw)
    path = Path(raw).resolve()
    single = None
    if path.name.endswith(".safetensors"):
        single, path = path.name, path.parent
    return SourceRef(
        str(path).rstrip("/") + "/" + (single or ""), "local", single=single, path=path
    )


def _check_path(uri: str, raw: str) -> None:
    # What the kernel would refuse, refused here with the reason: otherwise Path.resolve
    # and stat fail with ValueError or ENAMETOOLONG, which reach the caller as internal
    # errors, and resolve walks a megabyte path one name at a time.
    if "\0" in raw:
        raise InvalidRequest(f"{quote(uri)} is not a valid path: it contains a NUL byte")
    encoded = os.fsencode(raw)
    if len(encoded) > PATH_MAX:
        raise InvalidRequest(
            f"{quote(uri)} is not a valid path: it has {len(encoded)} bytes; the limit is "
            f"{PATH_MAX}"
        )
    longest = max(len(name) for name in encoded.split(b"/"))
    if longest > NAME_MAX:
        raise InvalidRequest(
            f"{quote(uri)} is not a valid path: a name in it has {longest} bytes; the limit "
            f"is {NAME_MAX}"
        )


def check_allowed(ref: SourceRef, settings: Settings) -> None:
    if settings.allow_any_source:
        return
    target = ref.uri if ref.scheme == "s3" else str(ref.path).rstrip("/") + "/"
    for entry in settings.allow:
        allowed = normalize_allow_entry(entry)
        if allowed.startswith("s3://") != (ref.scheme == "s3"):
            continue
        if target.startswith(allowed) or (ref.single is None and target == allowed):
            return
    raise SourceNotAllowed(
        f"{quote(ref.uri, bare=True)} is not in the daemon's source allowlist; an operator "
        "can add it under [sources] allow in the daemon's config"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    ref: SourceRef
    files: tuple[tuple[ObjectInfo, Header], ...]
    others: tuple[ObjectInfo, ...]  # config.json, tokenizer files, ...
    version: str
    #: Retries the header and index reads took, by cause (for the load's record).
    read_retries: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter[str]
    )

    def names(self) -> Iterator[str]:
        """Every tensor's name, file by file (no object per tensor is built)."""
        return itertools.chain.from_iterable(h.tensors.names for _, h in self.files)


async def _weight_objects(
    reads: Reads, listing: list[ObjectInfo], max_tensors: int
) -> list[ObjectInfo]:
    store = reads.store
    by_name = {o.key: o for o in listing}
    index = by_name.get(INDEX_NAME)
    if index is None:
        weights = [o for o in listing if o.key.endswith(".safetensors")]
        if not weights:
            raise SourceNotFound(f"{store.uri}: no .safetensors files found")
        return weights
    if index.size > MAX_INDEX_BYTES:
        raise InvalidArtifact(f"{store.describe(index)} is larger than {MAX_INDEX_BYTES} bytes")
    raw = await reads.read(index, 0, index.size) if index.size else b""
    # Off the event loop: a 64 MiB index parses for seconds, and every call would wait.
    what = store.describe(index)
    if len(raw) >= OFFLOAD_BYTES:
        shards = await in_child("index", raw, what, max_tensors, what=what)
    else:
        shards = await asyncio.to_thread(index_shards, raw, what, max_tensors)
    del raw
    missing = [s for s in shards if s not in by_name or posixpath.basename(s) != s]
    if missing:
        raise SourceNotFound(
            f"{store.describe(index)} names shards that are missing: {quote(missing)}"
        )
    return [by_name[s] for s in shards]


async def _read_header(reads: Reads, obj: ObjectInfo, max_tensors: int) -> Header:
    what = reads.store.describe(obj)
    probe = await reads.read(obj, 0, min(obj.size, HEADER_PROBE_BYTES))
    total = header_length(probe, what, obj.size)
    if total > len(probe):
        probe += await reads.read(obj, len(probe), total - len(probe))
    # Off the event loop: 100k tensors parse for about a second, and every other call
    # (Status, other loads, lease renewals) would wait for it. Big headers parse in a
    # child: in a thread, the parse holds the GIL as long (see offload).
    if total < OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_header, probe, what, obj.size, max_tensors)
    header: Header = await in_child("header", probe, what, obj.size, max_tensors, what=what)
    return header


def is_weight_object(key: str) -> bool:
    """Objects whose bytes or layout are the weights: safetensors files, their index, and a
    prepared artifact's manifest and data objects. Not config.json or tokenizer files."""
    return key.endswith(".safetensors") or key == INDEX_NAME or key.startswith(RESERVED_PREFIX)


def listing_version(listing: list[ObjectInfo]) -> str:
    """A digest of the weight objects' names, sizes and ETags: changes when one is replaced.

    Computed from the listing alone, so a resident model is recognised with no GET; other
    files are served as they are when asked for, so editing them keeps the weights.
    """
    digest = hashlib.sha256()
    for obj in sorted(listing, key=lambda o: o.key):
        if is_weight_object(obj.key):
            digest.update(f"{obj.key}\0{obj.size}\0{obj.etag}\n".encode())
    return digest.hexdigest()[:16]


async def list_source(ref: SourceRef, store: Store) -> list[ObjectInfo]:
    listing = await store.list_objects()
    if not listing:
        raise SourceNotFound(f"{ref.uri}: no such object or prefix")
    return listing


async def read_source(
    ref: SourceRef, store: Store, listing: list[ObjectInfo], *,
    max_tensors: int = DEFAULT_MAX_TENSORS, policy: FetchPolicy | None = None,
) -> Source:  # fmt: skip
    """The weight files and their validated headers.

    ``max_tensors`` ([limits] max_tensors) applies to the index, to each header before its
    entries are built, and to all files together. Reads that fail for a reason that may
    pass are retried under ``policy``, as data ranges are.
    """
    reads = Reads(store, policy)
    weights = await _weight_objects(reads, listing, max_tensors)
    async with task_group() as tg:
        tasks = [tg.create_task(_read_header(reads, o, max_tensors)) for o in weights]
    files = tuple((o, t.result()) for o, t in zip(weights, tasks, strict=True))
    count = sum(len(header.tensors) for _, header in files)
    if count > max_tensors:
        raise too_many_tensors(ref.uri, "has", count, max_tensors)
    weight_keys = {o.key for o in weights}
    others = tuple(o for o in listing if o.key not in weight_keys)
    return Source(ref, files, others, listing_version(listing), reads.causes)
