"""Only the planned version's own bytes land (#25): range answers re-encoded on the way
(chunked, compressed), answers from another version (their ETag) and answers delimited by
the connection's end, through a fault proxy in front of a real SeaweedFS.

The CountingProxy stands for the store (the daemon's endpoint) or, for the proxy tests, for
a forward proxy: SeaweedFS serves the absolute URIs that a forward proxy relays.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import FailedPrecondition, SourceChanged
from tests.conftest import BUCKET, assert_clean, assert_same_tensors, daemon_env, running_daemon
from tests.conftest import upload as upload_model
from tests.test_access import free_port

CONFIG = 'chunk_size = "1MiB"\nattempts = 3'
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
TAIL = (
    "; tensorferry takes a range only as the object's own bytes, Content-Length long or "
    "ending with the connection"
)


@pytest.fixture
def model(s3: S3Server, tmp_path: Path, prefix: str) -> tuple[str, dict[str, torch.Tensor]]:
    write_model(tmp_path / "m", 4 << 20, shards=2, layer_bytes=1 << 20)
    want: dict[str, torch.Tensor] = {}
    for path in sorted((tmp_path / "m").glob("*.safetensors")):
        want.update(load_file(path))
    return upload_model(s3, tmp_path / "m", prefix), want


class FirstOnly:
    """Answer the first data GET of ``shard`` with ``fault``; remember which it was."""

    def __init__(self, shard: str, fault: Fault) -> None:
        self.shard, self.fault = shard, fault
        self.hit: RequestInfo | None = None
        self._lock = threading.Lock()

    def __call__(self, req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET or self.shard not in req.path:
            return None
        with self._lock:
            if self.hit is not None:
                return None
            self.hit = req
        return self.fault

    def bytes_(self) -> str:
        assert self.hit is not None
        return self.hit.headers["range"].removeprefix("bytes=")


@pytest.mark.parametrize(
    ("fault", "coding"),
    [
        (Fault(rechunk=True), "Transfer-Encoding: chunked"),
        (Fault(content_encoding="gzip"), "Content-Encoding: gzip"),
    ],
)
def test_a_range_answered_re_encoded_fails_the_load_saying_what_to_do(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], prefix: str, fault: Fault,
    coding: str,
) -> None:  # fmt: skip
    uri, _ = model
    hook = FirstOnly(SHARD1, fault)
    with (
        CountingProxy(s3.endpoint, fault=hook) as store,
        running_daemon(daemon_env(s3, store.endpoint), allow=[uri], s3_config=CONFIG) as d,
        d.client() as client,
    ):
        with pytest.raises(FailedPrecondition) as info:
            client.load(uri)
        assert_clean(d)
    # Refused, not retried (only the first answer was re-encoded: a retry would have passed).
    assert str(info.value) == (
        f"the store at {store.endpoint} answered bytes {hook.bytes_()} of "
        f"/{BUCKET}/{prefix}{SHARD1} with {coding}{TAIL}: if a proxy or load balancer in "
        "front of the store re-encodes answers, have it pass range answers through unchanged"
    )


def test_ranges_of_another_version_fail_the_load_as_source_changed(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], prefix: str
) -> None:
    uri, _ = model
    count = iter(range(1 << 30))

    def older(req: RequestInfo) -> Fault | None:
        # Every other data range of one shard, as a cache holding an older version serves.
        if req.kind is Kind.DATA_GET and SHARD2 in req.path and next(count) % 2 == 1:
            return Fault(etag='"0123456789abcdef0123456789abcdef"')
        return None

    with (
        CountingProxy(s3.endpoint, fault=older) as store,
        running_daemon(daemon_env(s3, store.endpoint), allow=[uri], s3_config=CONFIG) as d,
        d.client() as client,
    ):
        with pytest.raises(SourceChanged) as info:
            client.load(uri)
        assert_clean(d)
        assert store.stats().faults_fired >= 1
    assert str(info.value) == (
        f"s3://{BUCKET}/{prefix}{SHARD2} was replaced while it was being loaded; load it "
        "again to get the new version"
    )


def test_answers_ending_with_the_connection_and_etags_spelled_otherwise_load_right(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]], prefix: str
) -> None:
    uri, want = model
    client_s3 = s3.client()
    etags = {
        name: client_s3.head_object(Bucket=BUCKET, Key=prefix + name)["ETag"]
        for name in (SHARD1, SHARD2)
    }
    count = iter(range(1 << 30))

    def reshaped(req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        etag = etags[SHARD1 if SHARD1 in req.path else SHARD2]
        if next(count) % 2:
            return Fault(until_close=True, etag=f"W/{etag}")
        return Fault(etag=etag.strip('"'))

    with (
        CountingProxy(s3.endpoint, fault=reshaped) as store,
        running_daemon(daemon_env(s3, store.endpoint), allow=[uri], s3_config=CONFIG) as d,
        d.client() as client,
    ):
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        [record] = client.status().recent_loads
        del loaded
        assert_clean(d)
        stats = store.stats()
    assert stats.faults_fired == stats.requests[Kind.DATA_GET] >= 4
    assert record.retries == 0


def test_a_proxy_that_re_encodes_or_serves_another_version_is_gone_around(
    s3: S3Server, model: tuple[str, dict[str, torch.Tensor]]
) -> None:
    uri, want = model
    count = iter(range(1 << 30))

    def bad_proxy(req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        if next(count) % 2:
            return Fault(rechunk=True)
        return Fault(etag='"0123456789abcdef0123456789abcdef"')

    port = free_port()
    with (
        CountingProxy(s3.endpoint, fault=bad_proxy) as proxy,
        running_daemon(
            daemon_env(s3), allow=[uri], s3_config=f'{CONFIG}\nproxy = "{proxy.endpoint}"',
            extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
        ) as d,
        d.client() as client,
    ):  # fmt: skip
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        del loaded
        assert_clean(d)
        stats = proxy.stats()
        # Each data range the proxy spoiled was asked of the store directly, once.
        assert fallbacks(port) == stats.faults_fired == stats.requests[Kind.DATA_GET] >= 4
    # Logged once in 10 s: whichever came first.
    why = 'Transfer-Encoding: chunked|ETag "0123456789abcdef0123456789abcdef", not the planned'
    assert re.search(
        f'the proxy {proxy.endpoint} answered a range with ({why} "[0-9a-f]+"); '
        "asking the store directly \\(1 so far\\)\n",
        d.output(),
    )


def fallbacks(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^tensorferry_proxy_fallbacks_total (\S+)$", text, re.MULTILINE)
    assert m is not None, text
    return float(m.group(1))
