"""Selective loads fetch only the selected tensors' bytes; non-weight files are served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import InvalidRequest, SourceNotFound
from tests.conftest import BUCKET, Daemon, assert_same_tensors, daemon_env, running_daemon, upload


def test_selection_fetches_only_selected_bytes(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 8 << 20, shards=2, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    full = {}
    for f in sorted((tmp_path / "m").glob("*.safetensors")):
        full.update(load_file(f))
    select = ["layers.1.*", "layers.4.weight", "layers.7.bias"]
    want = {k: v for k, v in full.items() if k.startswith("layers.1.") or k in select}
    with (
        CountingProxy(s3.endpoint) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"]) as d,
        d.client() as client,
    ):
        proxy.reset()
        with client.load(uri, select=select) as model:
            assert_same_tensors(model.tensors, want)
        fetched = proxy.stats().body_bytes[Kind.DATA_GET]
        assert fetched == sum(t.nbytes for t in want.values())
        with client.load(uri) as everything:  # another selection is another model
            assert_same_tensors(everything.tensors, full)
        assert len(client.list()) == 2
        with pytest.raises(InvalidRequest) as info:
            client.load(uri, select=["layers.1.*", "nope.*"])
        assert info.value.message == f"{uri}: selection 'nope.*' matches no tensor"


def test_non_weight_files_are_served(
    s3: S3Server, daemon: Daemon, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 1 << 20, shards=2, layer_bytes=1 << 19)
    (tmp_path / "m" / "tokenizer.json").write_bytes(b"x" * (3 << 20))  # several chunks
    uri = upload(s3, tmp_path / "m", prefix)
    with daemon.client() as client:
        with client.load(uri) as model:
            assert model.files == ["config.json", "model.safetensors.index.json", "tokenizer.json"]
        config = json.loads(client.read_file(uri, "config.json"))
        assert config == json.loads((tmp_path / "m" / "config.json").read_text())
        assert client.read_file(uri, "tokenizer.json") == b"x" * (3 << 20)
        with pytest.raises(SourceNotFound) as info:
            client.read_file(uri, "model-00001-of-00002.safetensors")
        assert info.value.message == (
            f"{uri}: no file 'model-00001-of-00002.safetensors'; the files a source offers are "
            "listed in the ready event of Load"
        )
