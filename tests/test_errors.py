"""Every refusal: its status code, its exact message, and nothing left behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import TensorferryError
from tests.conftest import (
    BUCKET,
    MISSING_BUCKET,
    Daemon,
    as_bytes,
    assert_clean,
    daemon_env,
    running_daemon,
    upload,
)


def refusal(daemon: Daemon, uri: str) -> TensorferryError:
    with daemon.client() as client, pytest.raises(TensorferryError) as info:
        client.load(uri)
    assert daemon.segments() == []
    assert_clean(daemon)
    return info.value


def write_raw(directory: Path, header: object, data: bytes, raw_len: int | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    doc = json.dumps(header).encode() if not isinstance(header, bytes) else header
    length = len(doc) if raw_len is None else raw_len
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", length) + doc + data)


def test_missing_bucket(daemon: Daemon) -> None:
    err = refusal(daemon, f"s3://{MISSING_BUCKET}/llama/")
    assert err.code.name == "NOT_FOUND"
    assert err.message == (
        f"s3://{MISSING_BUCKET}/llama/: bucket '{MISSING_BUCKET}' does not exist"
    )


def test_missing_key(daemon: Daemon, prefix: str) -> None:
    uri = f"s3://{BUCKET}/{prefix}model.safetensors"
    err = refusal(daemon, uri)
    assert err.code.name == "NOT_FOUND"
    assert err.message == f"{uri}: no such object or prefix"


def test_wrong_secret_is_access_denied(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    env = daemon_env(s3)
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    with running_daemon(env, allow=[f"s3://{BUCKET}/"]) as d:
        err = refusal(d, uri)
    assert err.code.name == "PERMISSION_DENIED"
    assert err.message == (
        f"{uri}: the store denied access (SignatureDoesNotMatch); check the daemon's "
        "credentials (instance role, AWS_PROFILE or access keys) and the bucket policy"
    )


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "raw_len", "reason"),
    [
        (
            {"a": F32x2}, b"\0" * 8, 1 << 40,
            "is not a safetensors file: its header length field says 1099511627776 bytes "
            "but the file has {size} bytes",
        ),
        (
            b"{not json}", b"", None,
            "is not a valid safetensors file: its header is not JSON (Expecting property name "
            "enclosed in double quotes: line 1 column 2 (char 1))",
        ),
        (
            {"a": F32x2}, b"\0" * 4, None,
            "is not a valid safetensors file: tensor 'a' has data_offsets [0, 8] outside the "
            "data section of 4 bytes",
        ),
        (
            {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None,
            "is not a valid safetensors file: tensors 'a' and 'b' overlap",
        ),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
            "is not a valid safetensors file: tensor 'a' has 8 bytes but dtype F32 and shape "
            "[3] need 12",
        ),
    ],
    ids=["header-length", "bad-json", "offsets-past-end", "overlap", "shape-vs-nbytes"],
)  # fmt: skip
def test_not_safetensors(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str,
    header: object, data: bytes, raw_len: int | None, reason: str,
) -> None:  # fmt: skip
    write_raw(tmp_path / "m", header, data, raw_len)
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    uri = upload(s3, tmp_path / "m", prefix)
    err = refusal(daemon, uri)
    assert err.code.name == "INVALID_ARGUMENT"
    assert err.message == f"{uri}model.safetensors " + reason.format(size=size)


def test_misaligned_tensors_load_correctly(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    # save_file never writes this: an F32 at byte 1 and a BF16 at byte 13 of the data.
    data = bytes(range(1, 18))
    header = {
        "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        "h": {"dtype": "BF16", "shape": [2], "data_offsets": [13, 17]},
    }
    write_raw(tmp_path / "m", header, data)
    uri = upload(s3, tmp_path / "m", prefix)
    want = load_file(tmp_path / "m" / "model.safetensors")
    with daemon.client() as client, client.load(uri) as model:
        for name, tensor in want.items():
            got = model.tensors[name]
            assert got.dtype == tensor.dtype
            assert torch.equal(as_bytes(got), as_bytes(tensor))
            assert got.data_ptr() % got.element_size() == 0


def test_load_over_the_shm_budget(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    f = tmp_path / "m" / "model.safetensors"
    (header_len,) = struct.unpack("<Q", f.read_bytes()[:8])
    arena = -(-(f.stat().st_size - 8 - header_len) // 4096) * 4096
    budget = '[memory]\nshm_budget = "1MiB"\n'
    with running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config=budget) as d:
        err = refusal(d, uri)
    assert err.code.name == "RESOURCE_EXHAUSTED"
    assert err.message == (
        f"loading {uri} needs {arena} bytes of shared memory but only 1048576 are available "
        "(budget 1048576, in use 0); evict a model with `tensorferry evict` or raise "
        "[memory] shm_budget"
    )
