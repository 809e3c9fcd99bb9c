"""A `tensorferry prepare` run itself: killed mid-upload, and its memory bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.prepare.run import PARTS_IN_FLIGHT, READ_AHEAD
from tests._prepare_helpers import read_manifest, run_prepare, use_s3_directly
from tests.conftest import BUCKET


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_s3_directly(s3, monkeypatch)


def test_killed_prepare_reruns_to_the_same_manifest(
    s3: S3Server, tmp_path: Path, prefix: str, aws: None
) -> None:
    write_model(tmp_path / "m", 24 << 20, layer_bytes=4 << 20)
    src, dst = str(tmp_path / "m"), f"s3://{BUCKET}/{prefix}killed/"
    run_prepare(src, f"s3://{BUCKET}/{prefix}clean/")
    clean = read_manifest(s3, prefix + "clean/")
    client = s3.client()

    def uploads() -> list[str]:
        page = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "killed/")
        return [u["Key"] for u in page.get("Uploads", [])]

    def stall_parts(req: RequestInfo) -> Fault | None:
        return Fault(stall=30) if req.method == "PUT" and "partNumber=" in req.path else None

    with CountingProxy(s3.endpoint, fault=stall_parts) as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorferry", "prepare", src, dst, "-q"],
            env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not proxy.stats().faults_fired and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
    assert uploads() == [prefix + "killed/tensorferry.data.shared"]
    assert run_prepare(src, dst) is not None
    assert uploads() == []
    assert read_manifest(s3, prefix + "killed/") == clean


def test_prepare_streams_with_bounded_memory(tmp_path: Path) -> None:
    write_model(tmp_path / "m", 256 << 20, shards=2, layer_bytes=32 << 20)
    tracemalloc.start()
    try:
        run_prepare(str(tmp_path / "m"), str(tmp_path / "out"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Pieces read ahead (and the one being routed), parts in flight, the part being filled
    # and parts waiting for a slot: 8 MiB each, whatever the model's size.
    assert peak < (READ_AHEAD + 1 + PARTS_IN_FLIGHT + 3) * (8 << 20), peak
    assert (tmp_path / "out" / "tensorferry.data.shared").stat().st_size > 256 << 20
