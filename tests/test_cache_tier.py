"""A cluster cache tier: a SeaweedFS that `remote.mount`s the origin bucket and serves it over
S3 to a fleet of daemons; the origin sees about one copy of the model, then none."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.client import Client
from tensorferry.devtools.daemon import wait_serving
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server, run_seaweed
from tensorferry.devtools.seaweed_remote import (
    UNTRUSTED_REMOTE_FLAGS,
    cache_remote,
    configure_remote,
    mount_remote,
    remote_only_keys,
)
from tests.conftest import Daemon, assert_same_tensors, daemon_env, start_daemon, upload

FLEET = 8
ORIGIN_BUCKET = "tier-origin"
CACHED_BUCKET = "tier"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    # The origin (the session's SeaweedFS) is on loopback, which weed refuses by default.
    workdir = tmp_path_factory.mktemp("cache-tier")
    with run_seaweed(workdir, extra_flags=UNTRUSTED_REMOTE_FLAGS) as server:
        yield server


@contextlib.contextmanager
def fleet(cache: S3Server, n: int) -> Iterator[list[Daemon]]:
    """``n`` daemons (own sockets, arenas and workdirs) reading through the cache, started
    together: one at a time would cost n start-ups end to end on two cores."""
    daemons: list[Daemon] = []
    try:
        for _ in range(n):
            d = start_daemon(daemon_env(cache), allow=[f"s3://{CACHED_BUCKET}/"], wait=False)
            daemons.append(d)
        for d in daemons:
            d.instance = wait_serving(d.proc, d.socket, log=d.log).instance_id
        yield daemons
    finally:
        # Signal all first so their shutdowns overlap.
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in daemons:
            d.stop()
        leftover = [s for d in daemons for s in d.remove_sealed()]
        for d in daemons:
            shutil.rmtree(d.log.parent, ignore_errors=True)
        assert leftover == [], f"daemons left shared-memory segments: {leftover}"


def load_everywhere(daemons: list[Daemon], uri: str, want: dict[str, torch.Tensor]) -> None:
    def load(d: Daemon) -> None:
        with Client(d.socket) as client, client.load(uri) as model:
            assert_same_tensors(model.tensors, want)

    with ThreadPoolExecutor(len(daemons)) as pool:
        for future in [pool.submit(load, d) for d in daemons]:
            future.result()


def test_eight_daemons_through_a_remote_mount_cost_the_origin_one_copy_then_none(
    s3: S3Server, cache: S3Server, tmp_path: Path
) -> None:
    source = tmp_path / "m"
    write_model(source, 8 << 20, shards=4, layer_bytes=512 << 10)
    want: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("*.safetensors")):
        want.update(load_file(shard))
    model_bytes = sum(f.stat().st_size for f in source.iterdir())
    s3.create_bucket(ORIGIN_BUCKET)
    upload(s3, source, "llm/", bucket=ORIGIN_BUCKET)
    uri = f"s3://{CACHED_BUCKET}/llm/"

    with CountingProxy(s3.endpoint) as origin:
        # The cache holds the origin's keys and reaches it only through the counting proxy.
        configure_remote(cache, origin.endpoint, s3.access_key, s3.secret_key, name="origin")
        mount_remote(cache, CACHED_BUCKET, "origin", ORIGIN_BUCKET)
        cold = remote_only_keys(cache, CACHED_BUCKET, "llm/")
        assert sorted(cold) == sorted(f"llm/{f.name}" for f in source.iterdir())
        # The scale-out hook: a cold entry changes its ETag when first read, which breaks a
        # load that listed it before (If-Match), so the mount is warmed before daemons start.
        cache_remote(cache, CACHED_BUCKET, "llm/")

        t0 = time.monotonic()
        with fleet(cache, FLEET) as daemons:
            started = time.monotonic()
            assert len({d.instance for d in daemons}) == FLEET  # separate arenas, no sharing
            load_everywhere(daemons, uri, want)
            loaded = time.monotonic()
        first = origin.stats()
        origin_bytes = sum(first.body_bytes.values())
        print(
            f"round 1: {FLEET} daemons up in {started - t0:.1f} s, loaded in "
            f"{loaded - started:.1f} s; origin {origin_bytes} bytes for a {model_bytes}-byte "
            f"model ({origin_bytes / model_bytes:.3f}x), requests {first.requests}"
        )
        assert model_bytes <= origin_bytes <= 1.1 * model_bytes

        # Scale-in, then a fresh fleet: new daemons with nothing resident.
        origin.reset()
        with fleet(cache, FLEET) as daemons:
            load_everywhere(daemons, uri, want)
        second = origin.stats()
        print(f"round 2: origin requests {second.requests}")
        # Listings are answered from the cache's copy of the metadata too (0 requests of any
        # kind here), but only data is the claim: a metadata refresh would be legitimate.
        data = (Kind.DATA_GET, Kind.HEADER_GET, Kind.OBJECT_GET)
        assert sum(second.requests[k] for k in data) == 0
        assert sum(second.body_bytes[k] for k in data) == 0
