"""Parse and validate a safetensors header. The header is untrusted input.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section.
Every check here runs before any arena is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

from tensorferry.errors import InvalidArtifact

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


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    data_start: int  # byte offset of the data section in the file
    data_len: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]


def header_length(prefix: bytes, key: str, file_size: int) -> int:
    """Total bytes (8 + N) of the header, from the file's first bytes."""
    if len(prefix) < 8:
        raise InvalidArtifact(f"{key} is not a safetensors file: it has only {file_size} bytes")
    n: int = struct.unpack("<Q", prefix[:8])[0]
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise InvalidArtifact(
            f"{key} is not a safetensors file: its header length field says {n} bytes "
            f"but the file has {file_size} bytes"
        )
    return 8 + n


def _fail(key: str, what: str) -> InvalidArtifact:
    return InvalidArtifact(f"{key} is not a valid safetensors file: {what}")


def _tensor(key: str, name: str, info: Any, data_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _fail(key, f"entry {name!r} is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(key, f"tensor {name!r} has no dtype")
    if dtype not in DTYPE_SIZES:
        raise InvalidArtifact(
            f"{key}: tensor {name!r} has unsupported dtype {dtype!r} "
            f"(supported: {', '.join(sorted(DTYPE_SIZES))})"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape
    ):
        raise _fail(key, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _fail(key, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _fail(
            key,
            f"tensor {name!r} has data_offsets [{begin}, {end}] outside the data section "
            f"of {data_len} bytes",
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _fail(
            key,
            f"tensor {name!r} has {end - begin} bytes but dtype {dtype} and shape "
            f"{shape} need {expected}",
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def parse_header(raw: bytes, key: str, file_size: int) -> Header:
    """Validate the header bytes (all of them, length prefix included)."""
    total = header_length(raw, key, file_size)
    if len(raw) < total:
        raise _fail(key, f"header truncated: {len(raw)} of {total} bytes")
    try:
        doc = json.loads(raw[8:total])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(key, f"its header is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _fail(key, "its header is not a JSON object")
    data_len = file_size - total
    metadata: dict[str, str] = {}
    tensors: list[TensorEntry] = []
    for name, info in doc.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise _fail(key, "__metadata__ must map strings to strings")
            metadata = info
            continue
        tensors.append(_tensor(key, name, info, data_len))
    tensors.sort(key=lambda t: (t.begin, t.end))
    previous: TensorEntry | None = None
    for t in tensors:
        if t.nbytes == 0:
            continue
        if previous is not None and t.begin < previous.end:
            raise _fail(key, f"tensors {previous.name!r} and {t.name!r} overlap")
        previous = t
    return Header(total, data_len, tuple(tensors), metadata)
