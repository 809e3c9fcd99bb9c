"""End to end: SeaweedFS -> daemon -> this test process as the worker."""

from __future__ import annotations

import gc
import json
import struct
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tensorferry.client import InvalidArtifact, SourceNotAllowed
from tensorferry.devtools.modelgen import write_all_dtypes, write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import StoreUnavailable
from tests.conftest import (
    BUCKET,
    Daemon,
    assert_same_tensors,
    daemon_env,
    running_daemon,
    upload,
)


def load_dir(directory: Path) -> dict[str, object]:
    tensors: dict[str, object] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_every_dtype_scalars_and_empty_tensors(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    write_all_dtypes(tmp_path / "m")
    uri = upload(s3, tmp_path / "m", prefix)
    with daemon.client() as client, client.load(uri) as model:
        assert_same_tensors(model.tensors, load_dir(tmp_path / "m"))  # type: ignore[arg-type]
        assert model.tensors["BF16.scalar"].shape == ()
        assert model.tensors["F32.empty"].shape == (0, 4)


def test_sharded_model_with_index_from_s3_and_local_dir(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str, local_root: Path
) -> None:
    src = local_root / "sharded"
    write_model(src, 24 << 20, shards=3, layer_bytes=3 << 20)
    assert (src / "model.safetensors.index.json").exists()
    want = load_dir(src)
    uri = upload(s3, src, prefix)
    with daemon.client() as client:
        for source in (uri, str(src)):
            with client.load(source) as model:
                assert_same_tensors(model.tensors, want)  # type: ignore[arg-type]
                assert model.total_bytes == sum(t.nbytes for t in want.values())  # type: ignore[attr-defined]


def test_unknown_dtype_is_invalid_argument_naming_it(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    header = json.dumps({"w": {"dtype": "F4X", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0\0"
    )
    uri = upload(s3, tmp_path / "m", prefix)
    with daemon.client() as client, pytest.raises(InvalidArtifact) as info:
        client.load(uri)
    assert info.value.message == (
        f"{uri}model.safetensors: tensor 'w' has unsupported dtype 'F4X' (supported: BF16, "
        "BOOL, C64, F16, F32, F64, F8_E4M3, F8_E4M3FNUZ, F8_E5M2, F8_E5M2FNUZ, I16, I32, I64, "
        "I8, U16, U32, U64, U8)"
    )
    assert daemon.segments() == []


def test_view_outlives_close_and_eviction(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 4 << 20, layer_bytes=1 << 20)
    want = load_dir(tmp_path / "m")
    uri = upload(s3, tmp_path / "m", prefix)
    with daemon.client() as client:
        model = client.load(uri)
        name = sorted(model.tensors)[0]
        kept = model.tensors[name]
        assert client.list()[0].leases == 1
        model.close()
        del model
        gc.collect()
        # The lease stays while a view lives.
        assert client.list()[0].leases == 1
        client.evict(uri)
        assert daemon.segments() != []  # freed only after the last lease
        assert_same_tensors({name: kept}, {name: want[name]})  # type: ignore[dict-item]
        del kept
        gc.collect()
        deadline = time.monotonic() + 10
        while client.list() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.list() == []
        assert daemon.segments() == []


def test_allowlist_denial_sends_no_request(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    upload(s3, tmp_path / "m", prefix)
    with CountingProxy(s3.endpoint) as proxy:
        env = daemon_env(s3, proxy.endpoint)
        with running_daemon(env, allow=[f"s3://{BUCKET}/{prefix}allowed/"]) as d:
            proxy.reset()
            with d.client() as client, pytest.raises(SourceNotAllowed) as info:
                client.load(f"s3://{BUCKET}/{prefix}")
            assert info.value.code.name == "PERMISSION_DENIED"
            assert info.value.message == (
                f"s3://{BUCKET}/{prefix} is not in the daemon's source allowlist; an operator "
                "can add it under [sources] allow in the daemon's config"
            )
            assert sum(proxy.stats().requests.values()) == 0


def test_wrong_content_range_fails_the_load(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)

    def shift_range(req: RequestInfo) -> Fault | None:
        if req.kind is Kind.DATA_GET:
            return Fault(content_range="bytes 1-100/200")
        return None

    with (
        CountingProxy(s3.endpoint, fault=shift_range) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"]) as d,
    ):
        with d.client() as client, pytest.raises(StoreUnavailable) as info:
            client.load(uri)
        assert info.value.code.name == "UNAVAILABLE"
        msg = info.value.message
        assert msg.startswith(f"{uri}model.safetensors: the store answered the range GET")
        assert "with Content-Range 'bytes 1-100/200'; refusing the response" in msg
        assert d.segments() == []
        assert proxy.stats().faults_fired >= 1
