"""Parse and validate a safetensors header. The header is untrusted input.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section.
Every check here runs before any arena is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from tensorferry.errors import InvalidArtifact, ResourceExhausted, quote

#: safetensors dtype name -> bytes per element (the table safetensors.torch knows).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
    "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

#: safetensors refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
#: The first read of every file; most headers fit, larger ones take one more read.
HEADER_PROBE_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Entries(Sequence[TensorEntry]):
    """A header's tensors as columns, in (begin, end) order; items are built on access.

    A header of 200k tensors held as 200k objects costs every full pass of the garbage
    collector while they live, and while they are built passes of 40-130 ms hold the
    event loop. Columns of strings and ints are a few objects for the collector, and
    they pickle in milliseconds (big headers are parsed in a child process).
    """

    __slots__ = ("begins", "dtypes", "ends", "names", "shapes")

    def __init__(
        self, names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]],
        begins: list[int], ends: list[int],
    ) -> None:  # fmt: skip
        self.names = names
        self.dtypes = dtypes
        self.shapes = shapes
        self.begins = begins
        self.ends = ends

    @classmethod
    def of(cls, tensors: Iterable[TensorEntry]) -> Entries:
        ts = sorted(tensors, key=lambda t: (t.begin, t.end))
        return cls([t.name for t in ts], [t.dtype for t in ts], [t.shape for t in ts],
                   [t.begin for t in ts], [t.end for t in ts])  # fmt: skip

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, i: int) -> TensorEntry: ...
    @overload
    def __getitem__(self, i: slice) -> Entries: ...
    def __getitem__(self, i: int | slice) -> TensorEntry | Entries:
        if isinstance(i, slice):
            return Entries(self.names[i], self.dtypes[i], self.shapes[i], self.begins[i],
                           self.ends[i])  # fmt: skip
        return TensorEntry(self.names[i], self.dtypes[i], self.shapes[i], self.begins[i],
                           self.ends[i])  # fmt: skip

    def __iter__(self) -> Iterator[TensorEntry]:
        return map(TensorEntry, self.names, self.dtypes, self.shapes, self.begins, self.ends)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    data_start: int  # byte offset of the data section in the file
    data_len: int
    tensors: Entries
    metadata: dict[str, str]


def header_length(prefix: bytes, key: str, file_size: int) -> int:
    """Total bytes (8 + N) of the header, from the file's first bytes."""
    if len(prefix) < 8:
        raise InvalidArtifact(f"{key} is not a safetensors file: it has only {file_size} bytes")
    n: int = struct.unpack("<Q", prefix[:8])[0]
    if 8 + n > file_size:
        raise InvalidArtifact(
            f"{key} is not a safetensors file: its header length field says {n} bytes "
            f"but the file has {file_size} bytes"
        )
    if n > MAX_HEADER_BYTES:
        raise InvalidArtifact(
            f"{key} is not a safetensors file: its header length field says {n} bytes, "
            f"above the {MAX_HEADER_BYTES} bytes a safetensors header may have"
        )
    return 8 + n


def too_many_tensors(what: str, verb: str, count: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} {verb} {count} tensors, above this daemon's limit of {limit} "
        "([limits] max_tensors); raise the limit in the daemon's config"
    )


class DuplicateKeys:
    """``object_pairs_hook`` for json.loads: a plain dict, noting the first repeated key.

    json.loads keeps the last of repeated keys; safetensors refuses them, and so do we.
    The hook only notes the repeat: which object held it (a tensor's entry, or the top
    level) is known only once the whole document is built.
    """

    def __init__(self) -> None:
        self.first: tuple[dict[str, Any], str] | None = None

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and self.first is None:
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    self.first = (obj, k)
                    break
                seen.add(k)
        return obj


class NestedTooDeeply(ValueError):
    """JSON nested past the interpreter's recursion limit (RecursionError is no ValueError:
    it would reach the client as an internal error)."""


def loads(raw: bytes, hook: DuplicateKeys) -> Any:
    try:
        return json.loads(raw, object_pairs_hook=hook)
    except RecursionError:
        raise NestedTooDeeply from None


def _fail(key: str, what: str) -> InvalidArtifact:
    return InvalidArtifact(f"{key} is not a valid safetensors file: {what}")


#: One str per dtype and one tuple per distinct shape, shared by all tensors that have it:
#: JSON parsing makes new ones for each tensor, a model has few distinct ones, and a
#: resident model keeps its tensors' entries for as long as it is resident.
_DTYPES = {d: d for d in DTYPE_SIZES}


def _tensor(
    key: str, name: str, info: Any, data_len: int, shapes: dict[tuple[int, ...], tuple[int, ...]]
) -> TensorEntry:
    if not isinstance(info, dict):
        raise _fail(key, f"entry {quote(name)} is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(key, f"tensor {quote(name)} has no dtype")
    if dtype not in DTYPE_SIZES:
        raise InvalidArtifact(
            f"{key}: tensor {quote(name)} has unsupported dtype {quote(dtype)} "
            f"(supported: {', '.join(sorted(DTYPE_SIZES))})"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape
    ):
        raise _fail(key, f"tensor {quote(name)} has an invalid shape {quote(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _fail(key, f"tensor {quote(name)} has invalid data_offsets {quote(offsets)}")
    begin, end = offsets
    if begin > end:
        raise _fail(
            key,
            f"tensor {quote(name)} has data_offsets [{begin}, {end}] that end before they begin",
        )
    if begin < 0 or end > data_len:
        raise _fail(
            key,
            f"tensor {quote(name)} has data_offsets [{begin}, {end}] outside the data section "
            f"of {data_len} bytes",
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _fail(
            key,
            f"tensor {quote(name)} has {end - begin} bytes but dtype {dtype} and shape "
            f"{quote(shape)} need {expected}",
        )
    dims = tuple(shape)
    return TensorEntry(name, _DTYPES[dtype], shapes.setdefault(dims, dims), begin, end)


def _duplicate(key: str, doc: dict[str, Any], hook: DuplicateKeys) -> InvalidArtifact | None:
    if hook.first is None:
        return None
    owner, repeated = hook.first
    if owner is doc:
        return _fail(key, f"tensor {quote(repeated)} appears twice in its header")
    name = next((n for n, info in doc.items() if info is owner), None)
    if name is None:
        where = "its header"
    elif name == "__metadata__":
        where = "its __metadata__"
    else:
        where = f"tensor {quote(name)}"
    return _fail(key, f"{where} has the key {quote(repeated)} twice")


def parse_header(raw: bytes, key: str, file_size: int, max_tensors: int | None = None) -> Header:
    """Validate the header bytes (all of them, length prefix included).

    CPU-bound for large headers (a second per 100k tensors): run it off the event loop.
    """
    total = header_length(raw, key, file_size)
    if len(raw) < total:
        raise _fail(key, f"header truncated: {len(raw)} of {total} bytes")
    hook = DuplicateKeys()
    try:
        doc = loads(raw[8:total], hook)
    except NestedTooDeeply:
        raise _fail(key, "its header nests JSON too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(key, f"its header is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _fail(key, "its header is not a JSON object")
    duplicate = _duplicate(key, doc, hook)
    if duplicate is not None:
        raise duplicate
    count = len(doc) - ("__metadata__" in doc)
    if max_tensors is not None and count > max_tensors:
        raise too_many_tensors(key, "has", count, max_tensors)
    data_len = file_size - total
    metadata: dict[str, str] = {}
    tensors: list[TensorEntry] = []
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    # Each entry is dropped once read: the parsed document is several times the size of
    # the entries made from it, and need not be alive at the same time as all of them.
    for name in list(doc):
        info = doc.pop(name)
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise _fail(key, "__metadata__ must map strings to strings")
            metadata = info
            continue
        tensors.append(_tensor(key, name, info, data_len, shapes))
    entries = Entries.of(tensors)
    del tensors
    previous: TensorEntry | None = None
    for t in entries:
        if t.nbytes == 0:
            continue
        if previous is not None and t.begin < previous.end:
            raise _fail(key, f"tensors {quote(previous.name)} and {quote(t.name)} overlap")
        previous = t
    return Header(total, data_len, entries, metadata)
