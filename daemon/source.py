"""Sources: parse a URI, check it against the allowlist, list its files, read headers.

Every check that can refuse a load runs here, before the store sees a data request and
before any arena exists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import posixpath
from pathlib import Path
from typing import Any

from tensorferry.daemon.config import DEFAULT_MAX_TENSORS, Settings, normalize_allow_entry
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.tasks import task_group
from tensorferry.errors import (
    InvalidArtifact,
    InvalidRequest,
    SourceNotAllowed,
    SourceNotFound,
    quote,
)
from tensorferry.format.manifest import RESERVED_PREFIX
from tensorferry.format.safetensors import (
    HEADER_PROBE_BYTES,
    DuplicateKeys,
    Header,
    NestedTooDeeply,
    header_length,
    loads,
    parse_header,
    too_many_tensors,
)

INDEX_NAME = "model.safetensors.index.json"
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


def _index_shards(raw: bytes, what: str, max_tensors: int) -> list[str]:
    """The shard names an index maps tensors to (CPU-bound for big indexes)."""
    hook = DuplicateKeys()
    try:
        doc: Any = loads(raw, hook) if raw else None
        weight_map = doc["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(s, str) for s in shards):
            raise TypeError
    except NestedTooDeeply:
        raise InvalidArtifact(f"{what} is not a valid index: it nests JSON too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InvalidArtifact(
            f"{what} is not a valid index: expected a JSON object with a "
            '"weight_map" of tensor name -> shard file name'
        ) from None
    if hook.first is not None and hook.first[0] is weight_map:
        raise InvalidArtifact(
            f"{what} is not a valid index: its weight_map names tensor {quote(hook.first[1])} twice"
        )
    # The index knows the tensor count before any header is read.
    if len(weight_map) > max_tensors:
        raise too_many_tensors(what, "lists", len(weight_map), max_tensors)
    return shards


async def _weight_objects(
    store: Store, listing: list[ObjectInfo], max_tensors: int
) -> list[ObjectInfo]:
    by_name = {o.key: o for o in listing}
    index = by_name.get(INDEX_NAME)
    if index is None:
        weights = [o for o in listing if o.key.endswith(".safetensors")]
        if not weights:
            raise SourceNotFound(f"{store.uri}: no .safetensors files found")
        return weights
    if index.size > MAX_INDEX_BYTES:
        raise InvalidArtifact(f"{store.describe(index)} is larger than {MAX_INDEX_BYTES} bytes")
    raw = await store.read(index, 0, index.size) if index.size else b""
    # Off the event loop: a 64 MiB index parses for seconds, and every call would wait.
    shards = await asyncio.to_thread(_index_shards, raw, store.describe(index), max_tensors)
    del raw
    missing = [s for s in shards if s not in by_name or posixpath.basename(s) != s]
    if missing:
        raise SourceNotFound(
            f"{store.describe(index)} names shards that are missing: {quote(missing)}"
        )
    return [by_name[s] for s in shards]


async def _read_header(store: Store, obj: ObjectInfo, max_tensors: int) -> Header:
    what = store.describe(obj)
    probe = await store.read(obj, 0, min(obj.size, HEADER_PROBE_BYTES))
    total = header_length(probe, what, obj.size)
    if total > len(probe):
        probe += await store.read(obj, len(probe), total - len(probe))
    # Off the event loop: 100k tensors parse for about a second, and every other call
    # (Status, other loads, lease renewals) would wait for it.
    return await asyncio.to_thread(parse_header, probe, what, obj.size, max_tensors)


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
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> Source:  # fmt: skip
    """The weight files and their validated headers.

    ``max_tensors`` ([limits] max_tensors) applies to the index, to each header before its
    entries are built, and to all files together.
    """
    weights = await _weight_objects(store, listing, max_tensors)
    async with task_group() as tg:
        tasks = [tg.create_task(_read_header(store, o, max_tensors)) for o in weights]
    files = tuple((o, t.result()) for o, t in zip(weights, tasks, strict=True))
    count = sum(len(header.tensors) for _, header in files)
    if count > max_tensors:
        raise too_many_tensors(ref.uri, "has", count, max_tensors)
    weight_keys = {o.key for o in weights}
    others = tuple(o for o in listing if o.key not in weight_keys)
    return Source(ref, files, others, listing_version(listing))
