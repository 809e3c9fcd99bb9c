"""Pure units: configuration, URIs and the allowlist, the safetensors header parser."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tensorferry.daemon.config.settings import ConfigError, Settings, load_settings, parse_size
from tensorferry.daemon.source import check_allowed, parse_uri
from tensorferry.errors import InvalidArtifact, InvalidRequest, SourceNotAllowed
from tensorferry.format.safetensors import parse_header


def test_sizes() -> None:
    assert parse_size("8MiB", "k") == 8 << 20
    assert parse_size("16 GiB", "k") == 16 << 30
    assert parse_size(4096, "k") == 4096
    with pytest.raises(ConfigError) as info:
        parse_size("lots", "memory.shm_budget")
    assert str(info.value) == (
        "memory.shm_budget: expected a byte size such as 8MiB or 16GiB, got 'lots'"
    )


def test_socket_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('socket = "/tmp/from-file.sock"\n[s3]\nchunk_size = "4MiB"\n')
    assert load_settings(config).socket == Path("/tmp/from-file.sock")
    assert load_settings(config).s3.chunk_size == 4 << 20
    monkeypatch.setenv("TENSORFERRY_SOCKET", "/tmp/from-env.sock")
    assert load_settings(config).socket == Path("/tmp/from-env.sock")
    assert load_settings(config, socket="/tmp/arg.sock").socket == Path("/tmp/arg.sock")
    monkeypatch.setenv("TENSORFERRY_CONFIG", str(config))
    assert load_settings().s3.chunk_size == 4 << 20


def test_bad_config_values_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[s3]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match=r"^s3.concurrency: must be 1..1024, got 0$"):
        load_settings(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("s3://b/models/llama/", True),
        ("s3://b/models/llama/model.safetensors", True),
        ("s3://b/models", True),
        ("s3://b/models-evil/x/", False),
        ("s3://b/other/", False),
        ("s3://c/models/", False),
        ("/srv/models/x", True),
        ("/srv/models-evil/x", False),
        ("file:///srv/models/x/", True),
        ("/srv/models/../secrets", False),
    ],
)
def test_allowlist_matches_whole_path_segments(uri: str, allowed: bool) -> None:
    settings = Settings(allow=("s3://b/models", "/srv/models"))
    ref = parse_uri(uri)
    if allowed:
        check_allowed(ref, settings)
    else:
        with pytest.raises(SourceNotAllowed):
            check_allowed(ref, settings)


@pytest.mark.parametrize("uri", ["s3://", "s3://b/../x/", "relative/dir", "http://x/y", ""])
def test_bad_uris_are_invalid_requests(uri: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_uri(uri)


def header(doc: object, data: bytes = b"", pad: int = 0) -> bytes:
    raw = json.dumps(doc).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + data


def parse(raw: bytes) -> object:
    return parse_header(raw, "k", len(raw))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00", "k is not a safetensors file: it has only 2 bytes"),
        (
            struct.pack("<Q", 10**12) + b"{}",
            "k is not a safetensors file: its header length field says 1000000000000 bytes "
            "but the file has 10 bytes",
        ),
        (
            struct.pack("<Q", 3) + b"{x}",
            "k is not a valid safetensors file: its header is not JSON (Expecting property "
            "name enclosed in double quotes: line 1 column 2 (char 1))",
        ),
        (header([1]), "k is not a valid safetensors file: its header is not a JSON object"),
        (
            header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "k is not a valid safetensors file: tensor 'a' has data_offsets [0, 8] outside the "
            "data section of 4 bytes",
        ),
        (
            header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "k is not a valid safetensors file: tensor 'a' has 8 bytes but dtype F32 and shape "
            "[3] need 12",
        ),
        (
            header(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "k is not a valid safetensors file: tensors 'a' and 'b' overlap",
        ),
        (
            header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
            "k is not a valid safetensors file: tensor 'a' has an invalid shape [-1]",
        ),
    ],
)
def test_bad_headers_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArtifact) as info:
        parse(raw)
    assert info.value.message == message


def test_good_header() -> None:
    raw = header(
        {
            "__metadata__": {"format": "pt"},
            "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
            "a": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
            "z": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},
        },
        b"\0" * 16,
    )
    h = parse_header(raw, "k", len(raw))
    assert [t.name for t in h.tensors] == ["a", "b", "z"]
    assert h.metadata == {"format": "pt"}
    assert h.data_len == 16


@pytest.mark.parametrize(("before", "after"), [(3, 2), (2, 3)], ids=["shrinks", "grows"])
async def test_a_freed_arena_is_reused_mapped_and_resized_to_the_next_load(
    tmp_path: Path, before: int, after: int
) -> None:
    from tensorferry.daemon.sinks.cpu_shm import CpuShmSink

    mib = 1 << 20
    async with CpuShmSink(tmp_path, recycle_budget=8 * mib) as sink:
        first = sink.allocate(before * mib, "m1")
        first.view[:4] = b"old!"
        sink.release(first)
        assert sink.recycled_bytes == before * mib
        (freed,) = tmp_path.glob("*.free*")
        second = sink.allocate(after * mib, "m2")  # the same pages, resized to fit
        assert bytes(second.view[:4]) == b"old!"
        assert len(second.view) == second.path.stat().st_size == after * mib
        second.view[-4:] = b"tail"
        assert not freed.exists()
        assert sink.recycled_bytes == 0
        sink.release(second, recycle=False)
        assert [p.suffix for p in tmp_path.glob("tensorferry.*")] == [".lock"]
    assert list(tmp_path.glob("tensorferry.*")) == []


async def test_a_load_gets_fresh_pages_when_no_freed_arena_can_serve(tmp_path: Path) -> None:
    from tensorferry.daemon.sinks.cpu_shm import CpuShmSink

    mib = 1 << 20
    async with CpuShmSink(tmp_path, recycle_budget=64 * mib) as sink:
        first = sink.allocate(2 * mib, "m1")
        first.view[:4] = b"old!"
        sink.release(first)
        big = sink.allocate(8 * mib, "m2")  # more than twice the freed one: the pool keeps it
        assert bytes(big.view[:4]) == bytes(4)
        assert sink.recycled_bytes == 2 * mib
        sink.release(big, recycle=False)
        # A slice still exported (a failed fetch's traceback) blocks the resize: the pool
        # entry is dropped and the load gets fresh, zeroed pages.
        again = sink.allocate(3 * mib, "m3")
        assert bytes(again.view[:4]) == b"old!"
        stray = again.view[:8]
        sink.release(again)
        fresh = sink.allocate(2 * mib, "m4")
        assert bytes(fresh.view[:4]) == bytes(4)
        assert list(tmp_path.glob("*.free*")) == []
        assert sink.recycled_bytes == 0
        stray.release()
        sink.release(fresh, recycle=False)
    assert list(tmp_path.glob("tensorferry.*")) == []
