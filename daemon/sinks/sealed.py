"""Sealed manifests: what a ready CPU arena holds, written beside it for the next daemon.

``tensorferry.<instance>.<token>.sealed`` names its segment by (st_dev, st_ino) and size,
and carries the model's key and tensor table. It is written only once the load's last
byte has landed, so a half-written arena never has one. The file is a msgpack body
followed by the body's sha256: a torn or edited manifest is refused, never half-read.

/dev/shm is world-writable: a manifest is believed only when it is a regular file of the
daemon's user with mode 0600, and only for the file its inode numbers name; every tensor
it describes must lie inside that segment. ``read_sealed`` says why one is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from tensorferry.daemon.planner import PlannedTensor
from tensorferry.format.safetensors import DTYPE_SIZES

if TYPE_CHECKING:  # daemon.model imports the sinks (through cpu_load)
    from tensorferry.daemon.model import ModelKey

FORMAT = 1
SUFFIX = ".sealed"
MAX_MANIFEST_BYTES = 64 << 20
_DIGEST = 32  # sha256
_PREFIX = "tensorferry."


class NotAdoptable(Exception):
    """Why a sealed arena may not be adopted: ``str(exc)`` is a short lowercase phrase."""


class OtherSocket(NotAdoptable):
    """Sealed by the daemon of another socket: that daemon's to adopt, if it comes back."""

    def __init__(self, socket: str) -> None:
        super().__init__(f"sealed by the daemon of socket {socket}")
        self.socket = socket


@dataclasses.dataclass(frozen=True, slots=True)
class SealedArena:
    socket: str  # str(settings.socket) of the daemon that sealed it
    uri: str
    weights: str
    version: str
    device: str
    select: tuple[str, ...]
    rank: int
    world_size: int
    #: (key, etag, size) of the listing the key came from.
    objects: tuple[tuple[str, str, int], ...]
    tensors: tuple[PlannedTensor, ...]
    #: Every tensor name of the source when known, else ().
    names: tuple[str, ...]
    size: int  # the segment's size in bytes
    sealed_at: float = 0.0
    #: Kept resident (``preload --pin``): an adopted model stays pinned.
    pinned: bool = False

    @property
    def key(self) -> ModelKey:
        from tensorferry.daemon.model import ModelKey

        return ModelKey(
            self.weights, self.version, self.device, self.select, self.rank, self.world_size
        )


def manifest_path(segment: Path) -> Path:
    return segment.with_name(segment.name + SUFFIX)


def is_manifest(path: Path) -> bool:
    return path.name.endswith(SUFFIX)


def _encode(arena: SealedArena, st: os.stat_result) -> bytes:
    body = {
        "format": FORMAT, "dev": st.st_dev, "ino": st.st_ino, "socket": arena.socket,
        "uri": arena.uri, "weights": arena.weights, "version": arena.version,
        "device": arena.device, "select": list(arena.select), "rank": arena.rank,
        "world_size": arena.world_size, "objects": [list(o) for o in arena.objects],
        "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in arena.tensors],
        "names": list(arena.names), "size": arena.size, "sealed_at": float(arena.sealed_at),
        "pinned": arena.pinned,
    }  # fmt: skip
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    return raw + hashlib.sha256(raw).digest()


def seal(segment: Path, fd: int, arena: SealedArena, *, replace: bool = False) -> Path:
    """Write the manifest of the segment open at ``fd`` (named ``segment``); its path.

    Written under a staging name and linked into place: a reader sees a whole manifest or
    none, and link(2) never replaces a file someone else put at that name (EEXIST).
    ``replace``: a new version of our own manifest there (rename(2) over it, atomically).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != arena.size:
        raise ValueError(f"{segment.name} has {st.st_size} bytes, the manifest {arena.size}")
    data = _encode(arena, st)
    instance = segment.name[len(_PREFIX) :].split(".", 1)[0]
    staging = segment.with_name(f"{_PREFIX}{instance}.sealing-{secrets.token_hex(16)}")
    final = manifest_path(segment)
    out = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                  | os.O_CLOEXEC, 0o600)  # fmt: skip
    try:
        os.fchmod(out, 0o600)  # whatever the umask: the reader insists on exactly 0600
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
        if replace:
            os.replace(staging, final)
        else:
            os.link(staging, final)
    finally:
        os.close(out)
        staging.unlink(missing_ok=True)
    return final


def _read(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotAdoptable("it has no sealed manifest") from None
    except OSError as exc:
        if os.path.islink(path):
            raise NotAdoptable("its manifest is a symlink") from None
        raise NotAdoptable(f"its manifest cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAdoptable("its manifest is not a regular file")
        if st.st_uid != os.geteuid():
            raise NotAdoptable(f"its manifest is owned by uid {st.st_uid}, not {os.geteuid()}")
        if stat.S_IMODE(st.st_mode) != 0o600:
            raise NotAdoptable(f"its manifest has mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
        if st.st_nlink != 1:
            raise NotAdoptable(f"its manifest has {st.st_nlink} names, not 1")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise NotAdoptable(f"its manifest has {st.st_size} bytes, over {MAX_MANIFEST_BYTES}")
        chunks: list[bytes] = []
        left = MAX_MANIFEST_BYTES + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise NotAdoptable(f"its manifest has over {MAX_MANIFEST_BYTES} bytes")
    return raw


def _is(value: object, kind: type[Any]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


class _Body:
    """Typed fields of a decoded manifest; a missing or mistyped one is ``NotAdoptable``."""

    def __init__(self, doc: dict[Any, Any]) -> None:
        self.doc = doc

    def get(self, name: str, kind: type[Any]) -> Any:
        value = self.doc.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _is(value, kind):
            raise NotAdoptable(f"its manifest's {name} is missing or malformed")
        return value

    def rows(self, name: str, *kinds: type[Any]) -> list[tuple[Any, ...]]:
        rows = []
        for row in self.get(name, list):
            if (
                not isinstance(row, list)
                or len(row) != len(kinds)
                or not all(_is(v, k) for v, k in zip(row, kinds, strict=True))
            ):
                raise NotAdoptable(f"its manifest's {name} is missing or malformed")
            rows.append(tuple(row))
        return rows

    def texts(self, name: str) -> tuple[str, ...]:
        values = self.get(name, list)
        if not all(isinstance(v, str) for v in values):
            raise NotAdoptable(f"its manifest's {name} is missing or malformed")
        return tuple(values)


def _decode(raw: bytes) -> tuple[SealedArena, int, int]:
    body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if len(raw) <= _DIGEST or hashlib.sha256(body).digest() != digest:
        raise NotAdoptable("its manifest's digest does not match its body")
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as exc:
        raise NotAdoptable(f"its manifest is not msgpack ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise NotAdoptable("its manifest is not a msgpack map")
    b = _Body(doc)
    if doc.get("format") != FORMAT:
        raise NotAdoptable(f"its manifest has format {doc.get('format')!r}, not {FORMAT}")
    tensors = []
    for name, dtype, shape, offset, nbytes in b.rows("tensors", str, str, list, int, int):
        if not all(_is(d, int) and d >= 0 for d in shape):
            raise NotAdoptable(f"its manifest's tensor {name!r} has a malformed shape")
        tensors.append(PlannedTensor(name, dtype, tuple(shape), offset, nbytes))
    arena = SealedArena(
        socket=b.get("socket", str), uri=b.get("uri", str), weights=b.get("weights", str),
        version=b.get("version", str), device=b.get("device", str), select=b.texts("select"),
        rank=b.get("rank", int), world_size=b.get("world_size", int),
        objects=tuple(b.rows("objects", str, str, int)), tensors=tuple(tensors),
        names=b.texts("names"), size=b.get("size", int), sealed_at=b.get("sealed_at", float),
        pinned=doc.get("pinned") is True,
    )  # fmt: skip
    return arena, b.get("dev", int), b.get("ino", int)


def _check_tensors(arena: SealedArena) -> None:
    seen: set[str] = set()
    for t in arena.tensors:
        if t.name in seen:
            raise NotAdoptable(f"its manifest names tensor {t.name!r} twice")
        seen.add(t.name)
        if t.dtype not in DTYPE_SIZES:
            raise NotAdoptable(f"its manifest's tensor {t.name!r} has unknown dtype {t.dtype!r}")
        if t.nbytes != math.prod(t.shape) * DTYPE_SIZES[t.dtype]:
            raise NotAdoptable(
                f"its manifest's tensor {t.name!r} has {t.nbytes} bytes, not the "
                f"{math.prod(t.shape) * DTYPE_SIZES[t.dtype]} of its shape and dtype"
            )
        if t.offset < 0 or t.nbytes < 0 or t.offset + t.nbytes > arena.size:
            raise NotAdoptable(
                f"its manifest's tensor {t.name!r} lies outside the segment "
                f"([{t.offset}, {t.offset + t.nbytes}) of {arena.size} bytes)"
            )


def read_sealed(segment: Path, fd: int, *, socket: str) -> SealedArena:
    """The manifest beside ``segment`` (open at ``fd``), checked; else ``NotAdoptable``."""
    arena, dev, ino = _decode(_read(manifest_path(segment)))
    st = os.fstat(fd)
    if (dev, ino) != (st.st_dev, st.st_ino):
        raise NotAdoptable("its manifest describes another file")
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise NotAdoptable(f"the segment is not a regular file owned by uid {os.geteuid()}")
    if st.st_nlink != 1:
        # Another name of the segment could outlive a recycle of it under this one (its
        # manifest beside the other name would then describe other bytes).
        raise NotAdoptable(f"the segment has {st.st_nlink} names, not 1")
    if arena.size <= 0:
        raise NotAdoptable("its manifest describes an empty segment")
    if st.st_size != arena.size:
        raise NotAdoptable(f"the segment has {st.st_size} bytes, its manifest says {arena.size}")
    if arena.socket != socket:
        raise OtherSocket(arena.socket)
    _check_tensors(arena)
    return arena
