"""Hostile input (issue #14): headers, indexes and URIs crafted to stall the daemon, to reach
it as an INTERNAL error, or to flood the status detail. Each comes back as a refusal with
its own status code and exact message, and the daemon keeps answering meanwhile.

Here: tensor limits, a big header parse, and a model's version; wrong status codes, long
echoes, misleading messages and duplicate names: test_hardening_input_messages.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorferry.daemon.config.settings import ConfigError, load_settings
from tensorferry.daemon.source import list_source, listing_version, parse_uri, read_source
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.daemon.store.local import LocalStore
from tensorferry.devtools.modelgen import write_model
from tensorferry.errors import InvalidArtifact, ResourceExhausted
from tests._hardening_input_helpers import F32x2, local_daemon, refusal, write_raw
from tests.conftest import Daemon, daemon_env, running_daemon

EMPTY = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}


def many_tensors(n: int) -> bytes:
    # json.dumps of n dicts is slow for the sizes used here; every entry is the same bytes.
    entry = json.dumps(EMPTY).encode()
    return b"{" + b",".join(b'"t%07d":%s' % (i, entry) for i in range(n)) + b"}"


@pytest.fixture
def local(local_root: Path) -> Iterator[Daemon]:
    """A daemon with no S3 behind it, allowed to read this test's local model folder."""
    with local_daemon(local_root) as d:
        yield d


# -- 5: many tensors -------------------------------------------------------------------------


def test_a_header_over_the_default_tensor_limit_is_refused(local: Daemon, local_root: Path) -> None:
    uri = write_raw(local_root / "m", many_tensors(200_001))
    err = refusal(local, uri)
    assert isinstance(err, ResourceExhausted)
    assert err.message == (
        f"{uri}model.safetensors has 200001 tensors, above this daemon's limit of 200000 "
        "([limits] max_tensors); raise the limit in the daemon's config"
    )


async def test_the_configured_tensor_limit_counts_every_shard(tmp_path: Path) -> None:
    write_raw(tmp_path, json.dumps({"a": EMPTY, "b": EMPTY}).encode(), name="x-1.safetensors")
    write_raw(tmp_path, json.dumps({"c": EMPTY}).encode(), name="x-2.safetensors")
    ref = parse_uri(str(tmp_path))
    store = LocalStore(tmp_path, ref.uri)
    listing = await list_source(ref, store)
    assert len((await read_source(ref, store, listing, max_tensors=3)).files) == 2
    with pytest.raises(ResourceExhausted) as one_file:
        await read_source(ref, store, listing, max_tensors=1)
    assert one_file.value.message == (
        f"{ref.uri}x-1.safetensors has 2 tensors, above this daemon's limit of 1 "
        "([limits] max_tensors); raise the limit in the daemon's config"
    )
    with pytest.raises(ResourceExhausted) as together:
        await read_source(ref, store, listing, max_tensors=2)
    assert together.value.message == (
        f"{ref.uri} has 3 tensors, above this daemon's limit of 2 "
        "([limits] max_tensors); raise the limit in the daemon's config"
    )


async def test_an_index_over_the_tensor_limit_is_refused_before_any_header(tmp_path: Path) -> None:
    weight_map = {f"t{i}": "missing.safetensors" for i in range(4)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ref = parse_uri(str(tmp_path))
    store = LocalStore(tmp_path, ref.uri)
    with pytest.raises(ResourceExhausted) as info:
        await read_source(ref, store, await list_source(ref, store), max_tensors=3)
    assert info.value.message == (
        f"{ref.uri}model.safetensors.index.json lists 4 tensors, above this daemon's limit "
        "of 3 ([limits] max_tensors); raise the limit in the daemon's config"
    )


def test_max_tensors_is_a_limits_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    assert load_settings(None).limits.max_tensors == 200_000
    config.write_text("[limits]\nmax_tensors = 5\n")
    assert load_settings(config).limits.max_tensors == 5
    shown = subprocess.run(
        [sys.executable, "-m", "tensorferry", "config", "show", "--config", str(config)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert json.loads(shown.stdout)["limits"]["max_tensors"] == 5
    config.write_text("[limits]\nmax_tensors = 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert str(info.value) == "limits.max_tensors: must be 1 or more, got 0"


def test_status_answers_while_a_big_header_is_parsed(local: Daemon, local_root: Path) -> None:
    # 100k tensors, then two that overlap: the load is refused only once the whole header
    # is parsed and checked, so its duration is the parse, nothing else.
    doc = many_tensors(100_000)[:-1] + b',"a":%s,"b":%s}' % (
        json.dumps(F32x2).encode(),
        json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}).encode(),
    )
    uri = write_raw(local_root / "m", doc, b"\0" * 12)
    answered: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with local.client() as client:
            while not done.is_set():
                client.status()
                answered.append(time.monotonic())

    with local.client() as client:
        client.status()  # the channel is up before the clock starts
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            while not answered:
                time.sleep(0.001)
            start = time.monotonic()
            with pytest.raises(InvalidArtifact) as info:
                client.load(uri)
            end = time.monotonic()
        finally:
            done.set()
            poller.join()
    assert info.value.message == (
        f"{uri}model.safetensors is not a valid safetensors file: tensors 'a' and 'b' overlap"
    )
    marks = [start, *(t for t in answered if start < t < end), end]
    gap = max(b - a for a, b in itertools.pairwise(marks))
    assert gap < (end - start) / 2, f"Status stalled {gap:.2f} s of a {end - start:.2f} s load"


# -- the version of a model is its weights' -------------------------------------------------


def test_editing_config_json_keeps_the_resident_weights(local: Daemon, local_root: Path) -> None:
    write_model(local_root / "m", 1 << 20, layer_bytes=1 << 19)
    uri = str(local_root / "m")
    with local.client() as client:
        with client.load(uri) as first:
            assert not first.attached
        config = local_root / "m" / "config.json"
        config.write_text(json.dumps({"model_type": "edited"}))
        (local_root / "m" / "tokenizer.json").write_text("{}")
        with client.load(uri) as second:
            assert second.attached
        assert len(client.list()) == 1
        outcomes = [r.outcome for r in client.status().recent_loads]
    assert outcomes == ["ready", "attached"]


def test_the_version_digests_only_weight_objects() -> None:
    weights = [
        ObjectInfo("model-00001-of-00002.safetensors", 10, "e1"),
        ObjectInfo("model.safetensors.index.json", 5, "e2"),
        ObjectInfo("tensorferry.manifest.msgpack", 7, "e3"),
        ObjectInfo("tensorferry.data.00000", 9, "e4"),
    ]
    version = listing_version([*weights, ObjectInfo("config.json", 3, "c1")])
    assert listing_version([*weights, ObjectInfo("config.json", 4, "c2")]) == version
    assert listing_version([*weights, ObjectInfo("tokenizer.json", 1, "t")]) == version
    for i, obj in enumerate(weights):
        replaced = [*weights[:i], ObjectInfo(obj.key, obj.size, "new"), *weights[i + 1 :]]
        assert listing_version(replaced) != version, obj.key


def test_the_configured_tensor_limit_refuses_a_load(local_root: Path) -> None:
    uri = write_raw(local_root / "m", many_tensors(4))
    limits = "[limits]\nmax_tensors = 3\n"
    with running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=limits) as d:
        err = refusal(d, uri)
    assert isinstance(err, ResourceExhausted)
    assert err.message == (
        f"{uri}model.safetensors has 4 tensors, above this daemon's limit of 3 "
        "([limits] max_tensors); raise the limit in the daemon's config"
    )
