"""Hostile input (issue #14) refused with its own status code and an exact, bounded
message: deep JSON, bad paths, megabyte URIs and names, capped status details, misleading
header messages and duplicate names (the rest: test_hardening_input.py)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tensorferry.errors import InvalidArtifact, InvalidRequest, SourceNotFound, quote, to_status
from tensorferry.format.safetensors import MAX_HEADER_BYTES
from tests._hardening_input_helpers import F32x2, local_daemon, refusal, write_raw
from tests.conftest import Daemon


@pytest.fixture
def local(local_root: Path) -> Iterator[Daemon]:
    """A daemon with no S3 behind it, allowed to read this test's local model folder."""
    with local_daemon(local_root) as d:
        yield d


# -- 6: wrong status codes, unbounded echoes ---------------------------------------------------


def test_json_nested_deeply_in_a_header_is_invalid(local: Daemon, local_root: Path) -> None:
    uri = write_raw(local_root / "m", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    err = refusal(local, uri)
    assert isinstance(err, InvalidArtifact)
    assert err.message == (
        f"{uri}model.safetensors is not a valid safetensors file: its header nests JSON too deeply"
    )


def test_json_nested_deeply_in_an_index_is_invalid(local: Daemon, local_root: Path) -> None:
    (local_root / "m").mkdir()
    (local_root / "m" / "model.safetensors.index.json").write_text(
        '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    err = refusal(local, str(local_root / "m") + "/")
    assert isinstance(err, InvalidArtifact)
    assert err.message == (
        f"{local_root}/m/model.safetensors.index.json is not a valid index: it nests JSON "
        "too deeply"
    )


def test_a_nul_byte_in_a_path_is_invalid(local: Daemon, local_root: Path) -> None:
    uri = f"{local_root}/x\0y"
    err = refusal(local, uri)
    assert isinstance(err, InvalidRequest)
    assert err.message == f"{uri!r} is not a valid path: it contains a NUL byte"


def test_a_file_name_over_name_max_is_invalid(local: Daemon, local_root: Path) -> None:
    uri = f"{local_root}/{'a' * 300}"
    err = refusal(local, uri)
    assert isinstance(err, InvalidRequest)
    assert err.message == (
        f"{quote(uri)} is not a valid path: a name in it has 300 bytes; the limit is 255"
    )


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("/srv/" + "a" * 1_000_000, "is not a valid path: it has 1000005 bytes; the limit is 4095"),
        (
            "s3://models/" + "k/" * 500_000,
            "is not a valid s3://bucket/prefix/ URI: its key has 1000000 bytes; the limit is 1024",
        ),
    ],
    ids=["local", "s3"],
)
def test_a_megabyte_uri_gets_a_short_answer(local: Daemon, uri: str, reason: str) -> None:
    err = refusal(local, uri)
    assert isinstance(err, InvalidRequest)
    assert err.message == f"{uri[:200]!r}... ({len(uri)} characters) {reason}"


def test_a_megabyte_file_name_gets_a_short_answer(local: Daemon, local_root: Path) -> None:
    # GetFile quotes the name it did not find, cut (the cap on every status detail is the
    # backstop: test_status_details_are_capped).
    uri = write_raw(local_root / "m", json.dumps({"a": F32x2}).encode(), b"\0" * 8)
    with local.client() as client, pytest.raises(SourceNotFound) as info:
        client.read_file(uri, "x" * 1_000_000)
    assert info.value.message == (
        f"{uri}: no file '{'x' * 200}'... (1000000 characters); the files a source offers "
        "are listed in the ready event of Load"
    )


def test_status_details_are_capped() -> None:
    code, details, _ = to_status(InvalidRequest("é" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Details travel percent-encoded in a header: every byte of "é" costs three.
    assert details == "é" * 675 + "... (status detail cut: 100000 characters)"
    code, details, _ = to_status(RuntimeError("x" * 100_000))
    assert code == grpc.StatusCode.INTERNAL
    assert details == (
        "internal error in the tensorferry daemon: RuntimeError: " + "x" * 3998
        + "... (status detail cut: 100079 characters)"
    )  # fmt: skip


def test_quote_cuts_long_input() -> None:
    assert quote("a\0b") == "'a\\x00b'"
    assert quote("x" * 201) == "'" + "x" * 200 + "'... (201 characters)"
    assert quote(list(range(1000))).startswith("[0, 1, 2")
    assert quote(list(range(1000))).endswith("... (4890 characters)")


# -- 7: misleading messages ------------------------------------------------------------------


def test_a_header_over_the_cap_names_the_cap(local: Daemon, local_root: Path) -> None:
    (local_root / "m").mkdir()
    path = local_root / "m" / "model.safetensors"
    with open(path, "wb") as f:  # sparse: only the first bytes are ever read
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 1024)
    err = refusal(local, str(local_root / "m"))
    assert isinstance(err, InvalidArtifact)
    assert err.message == (
        f"{local_root}/m/model.safetensors is not a safetensors file: its header length "
        "field says 100000001 bytes, above the 100000000 bytes a safetensors header may have"
    )


def test_offsets_that_end_before_they_begin(local: Daemon, local_root: Path) -> None:
    doc = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [16, 8]}}
    uri = write_raw(local_root / "m", json.dumps(doc).encode(), b"\0" * 16)
    err = refusal(local, uri)
    assert isinstance(err, InvalidArtifact)
    assert err.message == (
        f"{uri}model.safetensors is not a valid safetensors file: tensor 'a' has "
        "data_offsets [16, 8] that end before they begin"
    )


# -- 9: duplicate names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (
            b'{"a": %s, "b": %s, "a": %s}' % ((json.dumps(F32x2).encode(),) * 3),
            "tensor 'a' appears twice in its header",
        ),
        (
            b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            "tensor 'a' has the key 'dtype' twice",
        ),
    ],
    ids=["tensor", "field"],
)
def test_duplicate_keys_in_a_header(
    local: Daemon, local_root: Path, doc: bytes, reason: str
) -> None:
    uri = write_raw(local_root / "m", doc, b"\0" * 8)
    err = refusal(local, uri)
    assert isinstance(err, InvalidArtifact)
    assert err.message == f"{uri}model.safetensors is not a valid safetensors file: {reason}"


def test_duplicate_tensor_in_an_index(local: Daemon, local_root: Path) -> None:
    uri = write_raw(local_root / "m", json.dumps({"a": F32x2}).encode(), b"\0" * 8)
    (local_root / "m" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "a": "model.safetensors"}}'
    )
    err = refusal(local, uri)
    assert isinstance(err, InvalidArtifact)
    assert err.message == (
        f"{uri}model.safetensors.index.json is not a valid index: its weight_map names "
        "tensor 'a' twice"
    )
