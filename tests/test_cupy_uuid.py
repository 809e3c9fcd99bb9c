"""The GPU UUID the cupy API reports: the key a worker's device is resolved by."""

from __future__ import annotations

import uuid

from tensorferry.cuda.cupy_api import _uuid_of

WHOLE = uuid.UUID("5c3d7a1e-9b2f-4e6a-8d1c-2f3e4a5b6c7d")
#: A zero byte in the middle: cupy turns the char[16] into bytes as a C string, so it
#: hands back only what comes before it.
WITH_ZERO = uuid.UUID("5c3d7a1e-9b00-4e6a-8d1c-2f3e4a5b6c7d")


def test_sixteen_bytes_from_cupy_are_the_uuid() -> None:
    assert _uuid_of({"uuid": WHOLE.bytes}, 0) == f"GPU-{WHOLE}"


def test_a_string_from_cupy_is_the_uuid_with_or_without_its_prefix() -> None:
    assert _uuid_of({"uuid": f"GPU-{WHOLE}"}, 0) == f"GPU-{WHOLE}"
    assert _uuid_of({"uuid": str(WHOLE)}, 0) == f"GPU-{WHOLE}"


# A short or absent UUID is read from the driver API, never torch: test_cuda_uuid.py.
