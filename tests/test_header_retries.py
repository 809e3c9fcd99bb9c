"""Header and index reads are retried as data ranges are (#25, defect 5).

A real SeaweedFS behind the counting proxy: the proxy resets or refuses the first read of a
safetensors header or of the index once, and the load still succeeds with every byte
right; a header that keeps failing ends the load with the reason and the attempts made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, FaultHook, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import StoreUnavailable
from tensorferry.format.manifest import MANIFEST_NAME
from tensorferry.v1 import tensorferry_pb2 as pb
from tests._prepare_helpers import run_prepare
from tests.conftest import (
    assert_clean,
    assert_same_tensors,
    daemon_env,
    running_daemon,
    upload,
)

INDEX = "model.safetensors.index.json"
CONFIG = 'chunk_size = "1MiB"\nattempts = 3\nread_timeout = 5'


def failing(matches: Callable[[RequestInfo], bool], fault: Fault, times: int) -> FaultHook:
    """A hook that gives ``fault`` to the first ``times`` requests that ``matches``."""
    left = [times]
    lock = threading.Lock()

    def hook(req: RequestInfo) -> Fault | None:
        with lock:
            if left[0] and matches(req):
                left[0] -= 1
                return fault
        return None

    return hook


def header_get(req: RequestInfo) -> bool:
    return req.kind is Kind.HEADER_GET and req.path.split("?")[0].endswith(".safetensors")


def index_get(req: RequestInfo) -> bool:
    return req.path.split("?")[0].endswith(INDEX)


def load(
    s3: S3Server, model: Path, prefix: str, hook: FaultHook, want: Path | None = None
) -> pb.LoadRecord:
    """One cold load of ``model`` through the proxy, its bytes checked against ``want``'s
    safetensors (``model``'s own by default); its record."""
    expected = {}
    for f in sorted((want or model).glob("*.safetensors")):
        expected.update(load_file(f))
    uri = upload(s3, model, prefix)
    with (
        CountingProxy(s3.endpoint, fault=hook) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=CONFIG) as d,
        d.client() as client,
    ):
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), expected)
        [record] = client.status().recent_loads
        assert proxy.stats().faults_fired == 1
        del loaded
        assert_clean(d)
    return record


@pytest.mark.parametrize(
    ("fault", "cause"),
    [(Fault(reset_after=0), "connection"), (Fault(status=503), "http-5")],
    ids=["reset", "503"],
)
def test_a_header_read_that_fails_once_is_retried(
    s3: S3Server, tmp_path: Path, prefix: str, fault: Fault, cause: str
) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=256 << 10)
    record = load(s3, tmp_path / "m", prefix, failing(header_get, fault, 1))
    assert record.outcome == "ready"
    assert record.retries == 1
    assert dict(record.retry_causes) == {cause: 1}


def test_an_index_read_that_fails_once_is_retried(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 2 << 20, shards=2, layer_bytes=256 << 10)
    assert (tmp_path / "m" / INDEX).exists()
    record = load(s3, tmp_path / "m", prefix, failing(index_get, Fault(reset_after=0), 1))
    assert record.outcome == "ready"
    assert dict(record.retry_causes) == {"connection": 1}


def test_a_header_that_keeps_failing_ends_the_load_with_the_reason(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=256 << 10)
    uri = upload(s3, tmp_path / "m", prefix)
    hook = failing(header_get, Fault(status=503, s3_code="InternalError"), 100)
    with (
        CountingProxy(s3.endpoint, fault=hook) as proxy,
        running_daemon(daemon_env(s3, proxy.endpoint), allow=[uri], s3_config=CONFIG) as d,
        d.client() as client,
    ):
        with pytest.raises(StoreUnavailable) as info:
            client.load(uri)
        assert proxy.stats().faults_fired == 3  # [s3] attempts
        assert_clean(d)
    assert info.value.message == (
        f"{uri}model.safetensors: the store answered HTTP 503 InternalError "
        "(gave up after 3 attempts; attempts exhausted)"
    )


def test_a_manifest_read_that_fails_once_is_retried(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=256 << 10)
    run_prepare(str(tmp_path / "m"), str(tmp_path / "out"))
    manifest = failing(lambda r: r.path.split("?")[0].endswith(MANIFEST_NAME), Fault(status=503), 1)
    record = load(s3, tmp_path / "out", prefix, manifest, want=tmp_path / "m")
    assert record.outcome == "ready"
