"""Sources: parse a URI, check it against the allowlist, list its files, read headers.

Every check that can refuse a load runs here, before the store sees a data request and
before any arena exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from pathlib import Path
from typing import Any

from tensorferry.daemon._tasks import task_group
from tensorferry.daemon.config import Settings, normalize_allow_entry
from tensorferry.daemon.safetensors import HEADER_PROBE_BYTES, Header, header_length, parse_header
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.errors import InvalidArtifact, InvalidRequest, SourceNotAllowed, SourceNotFound

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20


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
        parts = [p for p in key.split("/") if p]
        if not bucket or any(p in (".", "..") for p in parts) or "//" in key:
            raise InvalidRequest(f"{uri!r} is not a valid s3://bucket/prefix/ URI")
        single = None
        if parts and parts[-1].endswith(".safetensors"):
            single = parts.pop()
        prefix = "".join(p + "/" for p in parts)
        return SourceRef(f"s3://{bucket}/{prefix}{single or ''}", "s3", bucket, prefix, single)
    raw = uri[7:] if uri.startswith("file://") else uri
    if "://" in raw or not raw.startswith("/"):
        raise InvalidRequest(
            f"{uri!r} is not a supported source: use s3://bucket/prefix/ or an absolute "
            "directory path"
        )
    path = Path(raw).resolve()
    single = None
    if path.name.endswith(".safetensors"):
        single, path = path.name, path.parent
    return SourceRef(
        str(path).rstrip("/") + "/" + (single or ""), "local", single=single, path=path
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
        f"{ref.uri} is not in the daemon's source allowlist; an operator can add it "
        "under [sources] allow in the daemon's config"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    ref: SourceRef
    files: tuple[tuple[ObjectInfo, Header], ...]
    others: tuple[ObjectInfo, ...]  # config.json, tokenizer files, ...
    version: str


async def _weight_objects(store: Store, listing: list[ObjectInfo]) -> list[ObjectInfo]:
    by_name = {o.key: o for o in listing}
    index = by_name.get(INDEX_NAME)
    if index is None:
        weights = [o for o in listing if o.key.endswith(".safetensors")]
        if not weights:
            raise SourceNotFound(f"{store.uri}: no .safetensors files found")
        return weights
    if index.size > MAX_INDEX_BYTES:
        raise InvalidArtifact(f"{store.describe(index)} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc: Any = json.loads(await store.read(index, 0, index.size)) if index.size else None
        shards = sorted(set(doc["weight_map"].values()))
        if not all(isinstance(s, str) for s in shards):
            raise TypeError
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InvalidArtifact(
            f"{store.describe(index)} is not a valid index: expected a JSON object with a "
            '"weight_map" of tensor name -> shard file name'
        ) from None
    missing = [s for s in shards if s not in by_name or posixpath.basename(s) != s]
    if missing:
        raise SourceNotFound(f"{store.describe(index)} names shards that are missing: {missing}")
    return [by_name[s] for s in shards]


async def _read_header(store: Store, obj: ObjectInfo) -> Header:
    probe = await store.read(obj, 0, min(obj.size, HEADER_PROBE_BYTES))
    total = header_length(probe, store.describe(obj), obj.size)
    if total > len(probe):
        probe += await store.read(obj, len(probe), total - len(probe))
    return parse_header(probe, store.describe(obj), obj.size)


def listing_version(listing: list[ObjectInfo]) -> str:
    """A digest of every object's name, size and ETag: changes when any file is replaced.

    Computed from the listing alone, so a resident model is recognised with no GET.
    """
    digest = hashlib.sha256()
    for obj in sorted(listing, key=lambda o: o.key):
        digest.update(f"{obj.key}\0{obj.size}\0{obj.etag}\n".encode())
    return digest.hexdigest()[:16]


async def list_source(ref: SourceRef, store: Store) -> list[ObjectInfo]:
    listing = await store.list_objects()
    if not listing:
        raise SourceNotFound(f"{ref.uri}: no such object or prefix")
    return listing


async def read_source(ref: SourceRef, store: Store, listing: list[ObjectInfo]) -> Source:
    weights = await _weight_objects(store, listing)
    async with task_group() as tg:
        tasks = [tg.create_task(_read_header(store, o)) for o in weights]
    files = tuple((o, t.result()) for o, t in zip(weights, tasks, strict=True))
    weight_keys = {o.key for o in weights}
    others = tuple(o for o in listing if o.key not in weight_keys)
    return Source(ref, files, others, listing_version(listing))
