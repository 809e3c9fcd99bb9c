"""Forward proxies on the data path (#19), through a real one: tinyproxy from Debian.

The store sits behind a CountingProxy (a reverse proxy: it sees what reaches the origin);
tinyproxy is the forward proxy the daemon is configured with. tinyproxy adds ``Via`` to
each request it forwards, so the origin's log shows which requests came through it.
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.pki import make_pki
from tensorferry.devtools.proxy import CountingProxy, Kind
from tensorferry.devtools.seaweed import S3Server
from tensorferry.devtools.tinyproxy import (
    INSTALL_HINT,
    ForwardProxy,
    run_tinyproxy,
    tinyproxy_binary,
)
from tensorferry.errors import StoreUnavailable
from tests.conftest import BUCKET, assert_clean, assert_same_tensors, daemon_env, running_daemon
from tests.conftest import upload as upload_model
from tests.test_access import free_port

if tinyproxy_binary() is None:
    if os.environ.get("CI"):  # scripts/setup installs it in CI: its absence is a failure
        raise RuntimeError(INSTALL_HINT)
    pytest.skip(INSTALL_HINT, allow_module_level=True)


@pytest.fixture
def model(s3: S3Server, tmp_path: Path, prefix: str) -> tuple[str, dict[str, torch.Tensor]]:
    write_model(tmp_path / "m", 6 << 20, shards=2, layer_bytes=1 << 20)
    want: dict[str, torch.Tensor] = {}
    for path in sorted((tmp_path / "m").glob("*.safetensors")):
        want.update(load_file(path))
    return upload_model(s3, tmp_path / "m", prefix), want


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    with run_tinyproxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


def fallbacks(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^tensorferry_proxy_fallbacks_total (\S+)$", text, re.MULTILINE)
    assert m is not None, text
    return float(m.group(1))


def test_every_store_request_goes_through_a_real_forward_proxy(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], tinyproxy: ForwardProxy,
    prefix: str,
) -> None:  # fmt: skip
    uri, want = model
    port = free_port()
    s3_config = f'proxy = "{tinyproxy.endpoint}"\nchunk_size = "1MiB"'
    # Per-source headers, as Dragonfly's dfdaemon wants them.
    extra = (
        f'[s3.headers."s3://{BUCKET}/{prefix}"]\nX-Dragonfly-Tag = "tf-test"\n'
        f'X-Dragonfly-Piece-Length = "1048576"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    with (
        CountingProxy(s3.endpoint) as origin,
        running_daemon(
            daemon_env(s3, origin.endpoint), allow=[uri], s3_config=s3_config, extra_config=extra
        ) as d,
        d.client() as client,
    ):
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        del loaded
        assert_clean(d)
        assert fallbacks(port) == 0
        assert (
            f"http stores through {tinyproxy.endpoint}; https stores through "
            f"{tinyproxy.endpoint} (from the [s3] proxy); direct fallback on"
        ) in d.output()
    log = origin.stats().log
    data = [r for r in log if r.kind is Kind.DATA_GET]
    assert len(data) >= 6  # 6 MB in 1 MiB ranges
    # Every request the origin saw came through tinyproxy: listing and data alike.
    assert {r.headers.get("via", "").split(" (")[-1] for r in log} == {"tinyproxy/1.11.1)"}
    assert {r.headers.get("x-dragonfly-tag") for r in data} == {"tf-test"}
    assert {r.headers.get("x-dragonfly-piece-length") for r in data} == {"1048576"}
    # tinyproxy read each of them as an absolute URI, one log line each.
    through = [t for m, t in tinyproxy.requests() if m == "GET"]
    assert all(t.startswith(f"{origin.endpoint}/") for t in through)
    assert len(through) == len([r for r in log if r.method == "GET"])


def test_a_range_the_proxy_fails_is_asked_of_the_store_and_counted(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    uri, want = model
    port = free_port()
    s3_config = 'chunk_size = "1MiB"\nproxy = "%s"'
    extra = f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    # tinyproxy lists the bucket and passes the index but refuses the shards with an error
    # page of its own.
    with (
        run_tinyproxy(tmp_path / "tp", deny_urls=r"-of-[0-9]+\.safetensors") as proxy,
        CountingProxy(s3.endpoint) as origin,
        running_daemon(
            daemon_env(s3, origin.endpoint), allow=[uri], s3_config=s3_config % proxy.endpoint,
            extra_config=extra,
        ) as d,
        d.client() as client,
    ):  # fmt: skip
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        del loaded
        assert_clean(d)
        direct = [r for r in origin.stats().log if "via" not in r.headers]
        assert len(direct) >= 6
        assert all("-of-" in r.path and r.kind in (Kind.DATA_GET, Kind.HEADER_GET) for r in direct)
        assert fallbacks(port) == len(direct)
        refused = [t for m, t in proxy.requests() if "-of-" in t]
        assert len(refused) == len(direct)
        assert "asking the store directly" in d.output()


def test_without_fallback_a_proxy_error_fails_the_load_naming_the_proxy(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], tmp_path: Path, prefix: str
) -> None:
    uri, _ = model
    with (
        run_tinyproxy(tmp_path / "tp", deny_urls=r"-00001-of-") as proxy,
        running_daemon(
            daemon_env(s3), allow=[uri],
            s3_config=f'proxy = "{proxy.endpoint}"\nproxy_fallback = false\nattempts = 1',
        ) as d,
        d.client() as client,
        pytest.raises(StoreUnavailable) as info,
    ):  # fmt: skip
        client.load(uri)
    assert str(info.value) == (
        f"s3://{BUCKET}/{prefix}model-00001-of-00002.safetensors: the proxy "
        f"{proxy.endpoint} answered HTTP 403, not an S3 answer ([s3] proxy_fallback is off)"
    )


def test_an_https_store_is_reached_through_a_connect_tunnel(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], tinyproxy: ForwardProxy,
    tmp_path: Path,
) -> None:  # fmt: skip
    uri, want = model
    pki = make_pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "server.pem", tmp_path / "server_key.pem")
    s3_config = (
        f'proxy = "{tinyproxy.endpoint}"\nchunk_size = "1MiB"\nca_bundle = "{tmp_path / "ca.pem"}"'
    )
    assert pki["ca"]
    with (
        CountingProxy(s3.endpoint, tls=tls) as origin,
        running_daemon(daemon_env(s3, origin.endpoint), allow=[uri], s3_config=s3_config) as d,
        d.client() as client,
    ):
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        del loaded
        assert_clean(d)
        stats = origin.stats()
    assert stats.requests[Kind.DATA_GET] >= 6
    # tinyproxy saw only tunnels: one per connection the https origin accepted.
    seen = tinyproxy.requests()
    authority = urllib.parse.urlsplit(origin.endpoint).netloc
    assert {m for m, _ in seen} == {"CONNECT"}
    assert {t for _, t in seen} == {authority}
    assert len(seen) == stats.connections
