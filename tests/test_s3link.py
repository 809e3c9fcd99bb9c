"""The S3-like link: rate cap, first-byte delay, stalls and determinism through a real proxy."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import pytest

from tensorferry.devtools.proxy import CountingProxy, Kind, RequestInfo
from tensorferry.devtools.s3link import LinkShape, link_hook
from tensorferry.devtools.s3server import make_client
from tensorferry.devtools.seaweed import S3Server

from .conftest import BUCKET, upload

MIB = 1 << 20
SIZE = 8 * MIB
# Bytes [1 MiB, 9 MiB) of a 10 MiB object: from past byte 0, so the proxy counts a DATA_GET.
RANGE = f"bytes={MIB}-{MIB + SIZE - 1}"
SMALL = f"bytes={MIB}-{MIB + 64 * 1024 - 1}"


@pytest.fixture(scope="module")
def blob(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("s3link")
    (directory / "blob.bin").write_bytes(bytes(range(256)) * (10 * MIB // 256))
    uri = upload(s3, directory, f"s3link-{time.monotonic_ns()}/")
    return uri.removeprefix(f"s3://{BUCKET}/") + "blob.bin"


def proxied(s3: S3Server, proxy: CountingProxy) -> Any:
    return make_client(dataclasses.replace(s3, endpoint=proxy.endpoint))


def timed_get(client: Any, key: str, rng: str) -> tuple[float, int]:
    start = time.perf_counter()
    body = client.get_object(Bucket=BUCKET, Key=key, Range=rng)["Body"].read()
    return time.perf_counter() - start, len(body)


def data_get(number: int, rng: str = RANGE) -> RequestInfo:
    return RequestInfo(number, Kind.DATA_GET, "GET", "/models/x", {"range": rng})


def test_rate_cap_holds(s3: S3Server, blob: str) -> None:
    shape = LinkShape(first_byte_ms=0, tail_ms=0, rate_mbps=40)
    with CountingProxy(s3.endpoint, fault=link_hook(shape)) as proxy:
        client = proxied(s3, proxy)
        timed_get(client, blob, SMALL)  # connect and sign once, outside the measurement
        rates = []
        for _ in range(2):
            seconds, n = timed_get(client, blob, RANGE)
            assert n == SIZE
            assert seconds >= 0.18  # 8 MiB at 40 MB/s is 0.21 s
            rates.append(n / seconds / 1e6)
        print(f"effective MB/s at a 40 MB/s cap: {[round(r, 1) for r in rates]}")
        assert max(rates) <= 40 * 1.1
        assert min(rates) >= 40 * 0.4  # shaped, not starved
        assert proxy.stats().requests[Kind.DATA_GET] == 3


def test_first_byte_delay_and_unshaped_metadata(s3: S3Server, blob: str) -> None:
    shape = LinkShape(first_byte_ms=400, tail_ms=0, rate_mbps=math.inf)
    hook = link_hook(shape)
    with CountingProxy(s3.endpoint, fault=hook) as proxy:
        client = proxied(s3, proxy)
        client.head_object(Bucket=BUCKET, Key=blob)  # warm the connection
        seconds, n = timed_get(client, blob, SMALL)
        assert n == 64 * 1024
        assert 0.38 <= seconds < 3.0
        start = time.perf_counter()
        client.head_object(Bucket=BUCKET, Key=blob)
        client.list_objects_v2(Bucket=BUCKET, Prefix=blob.rsplit("/", 1)[0])
        assert time.perf_counter() - start < 0.35  # two metadata calls, neither delayed
        stats = proxy.stats()
        assert stats.requests[Kind.HEAD] == 2
        assert stats.requests[Kind.LIST] == 1
        assert stats.faults_fired == hook.shaped == 1
        assert hook.stalled == 0


def test_stall_fraction_one_stalls_every_data_get(s3: S3Server, blob: str) -> None:
    shape = LinkShape(first_byte_ms=0, tail_ms=0, rate_mbps=math.inf, stall_fraction=1.0,
                      stall_seconds=0.5)  # fmt: skip
    hook = link_hook(shape)
    with CountingProxy(s3.endpoint, fault=hook) as proxy:
        client = proxied(s3, proxy)
        client.head_object(Bucket=BUCKET, Key=blob)
        for _ in range(3):
            seconds, _n = timed_get(client, blob, SMALL)
            assert seconds >= 0.48
        assert hook.stalled == 3 == proxy.stats().requests[Kind.DATA_GET]
    assert link_hook(dataclasses.replace(shape, stall_fraction=0.0))(data_get(1)) is None


def test_same_seed_same_draws() -> None:
    shape = LinkShape(stall_fraction=0.3, seed=7)
    a, b, c = link_hook(shape), link_hook(shape), link_hook(dataclasses.replace(shape, seed=8))
    first = [a(data_get(i)) for i in range(200)]
    assert first == [b(data_get(i)) for i in range(200)]
    assert first != [c(data_get(i)) for i in range(200)]
    assert a.stalled == b.stalled
    assert 30 < a.stalled < 90
    head = RequestInfo(1, Kind.HEAD, "HEAD", "/models/x", {})
    assert a(head) is None
    assert a.shaped == 200


def test_delay_distribution_and_pacing() -> None:
    shape = LinkShape(first_byte_ms=30, tail_ms=60, rate_mbps=math.inf, seed=3)
    hook = link_hook(shape)
    delays = sorted(fault.stall or 0.0 for i in range(20000) if (fault := hook(data_get(i))))
    median, p99 = statistics.median(delays), delays[int(len(delays) * 0.99)]
    assert median == pytest.approx(0.030, rel=0.05)
    assert p99 == pytest.approx(0.090, rel=0.1)  # p99 = median + tail_ms
    # Pacing: whole-ms trickle plus a stall top-up that restores length / rate.
    assert LinkShape(rate_mbps=40).pacing(SIZE) == (0.001, pytest.approx(SIZE / 40e6 - 0.128))
    assert LinkShape(rate_mbps=90).pacing(SIZE) == (None, pytest.approx(SIZE / 90e6))
    assert LinkShape(rate_mbps=90).pacing(None) == (0.001, 0.0)


def test_parse() -> None:
    shape = LinkShape.parse(" first_byte_ms=10, rate_mbps=90,stall_fraction=0.01,seed=4 ")
    assert shape == LinkShape(first_byte_ms=10, rate_mbps=90, stall_fraction=0.01, seed=4)
    assert LinkShape.parse("") == LinkShape()
    with pytest.raises(ValueError, match=r"accepted keys: first_byte_ms, tail_ms, rate_mbps"):
        LinkShape.parse("first_byte=3")
    with pytest.raises(ValueError, match="not a number"):
        LinkShape.parse("seed=1.5")
    with pytest.raises(ValueError, match="stall_fraction"):
        LinkShape.parse("stall_fraction=2")
