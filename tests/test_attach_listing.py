"""``[sources] listing_reuse``: an attach within the window sends no LIST to the store, and
what a load still sees (every change made at least the window before it arrived)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file

from tensorferry.devtools.daemon import spawn_daemon, wait_serving, write_config
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import (
    BUCKET,
    Daemon,
    assert_clean,
    assert_same_tensors,
    daemon_env,
    short_dir,
    upload,
)


@contextlib.contextmanager
def reusing(s3: S3Server, window: float | None) -> Iterator[tuple[Daemon, CountingProxy]]:
    """A daemon with ``listing_reuse = window`` (None: the default) whose store calls go
    through a proxy that counts them."""
    with CountingProxy(s3.endpoint) as proxy:
        workdir = short_dir()
        config = write_config(workdir, [f"s3://{BUCKET}/"], prelude="shutdown_grace = 0\n")
        if window is not None:
            key = f"[sources]\nlisting_reuse = {window}\n"
            config.write_text(config.read_text().replace("[sources]\n", key, 1))
        socket, log = workdir / "tf.sock", workdir / "daemon.log"
        proc = spawn_daemon(config, socket, daemon_env(s3, proxy.endpoint), log=log)
        daemon = Daemon(socket, proc, log)
        try:
            daemon.instance = wait_serving(proc, socket, log=log).instance_id
            yield daemon, proxy
            assert_clean(daemon)
        finally:
            daemon.stop()
            leftover = daemon.remove_sealed()  # sealed arenas stay for a next daemon
            shutil.rmtree(workdir, ignore_errors=True)
            assert leftover == [], f"daemon left shared-memory segments: {leftover}"


def lists(proxy: CountingProxy) -> int:
    return proxy.stats().requests[Kind.LIST]


def models(tmp_path: Path) -> tuple[Path, Path]:
    for seed in (1, 2):
        write_model(tmp_path / f"v{seed}", 1 << 20, layer_bytes=1 << 19, seed=seed)
    return tmp_path / "v1", tmp_path / "v2"


def test_an_attach_in_the_window_reuses_the_listing_and_sees_changes_after_evict(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    v1, v2 = models(tmp_path)
    uri = upload(s3, v1, prefix)
    with reusing(s3, 600) as (daemon, proxy), daemon.client() as client:
        with client.load(uri) as first:
            assert not first.attached
        listed = lists(proxy)
        with client.load(uri) as again:
            assert again.attached
            assert again.model_id == first.model_id
        assert lists(proxy) == listed  # the resident model's key came from the last listing
        # A change inside the window: the resident version is what an attach gets (the
        # guarantee covers changes made at least `listing_reuse` seconds before a load)...
        upload(s3, v2, prefix)
        with client.load(uri) as stale:
            assert stale.attached
            assert stale.model_id == first.model_id
            assert_same_tensors(stale.tensors, load_file(v1 / "model.safetensors"))
        assert lists(proxy) == listed
        # ...and once that model is not resident, a load lists again and finds the change.
        client.evict(first.model_id)
        with client.load(uri) as new:
            assert not new.attached
            assert new.model_id != first.model_id
            assert_same_tensors(new.tensors, load_file(v2 / "model.safetensors"))
        assert lists(proxy) == listed + 1


def test_past_the_window_a_load_lists_again_and_finds_a_replaced_object(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    v1, v2 = models(tmp_path)
    uri = upload(s3, v1, prefix)
    window = 0.5
    with (
        reusing(s3, window) as (daemon, proxy),
        daemon.client() as client,
        client.load(uri) as old,
    ):
        upload(s3, v2, prefix)
        listed = lists(proxy)
        # The first load's listing began before it returned: past this, it is too old.
        time.sleep(window * 1.2)
        with client.load(uri) as new:
            assert not new.attached
            assert new.model_id != old.model_id
            assert_same_tensors(new.tensors, load_file(v2 / "model.safetensors"))
        assert lists(proxy) == listed + 1
        assert_same_tensors(old.tensors, load_file(v1 / "model.safetensors"))


def test_by_default_every_load_lists(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    v1, _ = models(tmp_path)
    uri = upload(s3, v1, prefix)
    with reusing(s3, None) as (daemon, proxy), daemon.client() as client, client.load(uri):
        listed = lists(proxy)
        with client.load(uri) as again:
            assert again.attached
        assert lists(proxy) == listed + 1
