"""Streamed loads (``Client.stream``): tensors handed out as their last byte lands (#16)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from safetensors.torch import load_file

from tensorferry.client import AsyncClient
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tests.conftest import (
    BUCKET,
    assert_clean,
    assert_same_tensors,
    daemon_env,
    running_daemon,
    upload,
)

CONFIG = 'chunk_size = "1MiB"\nconcurrency = 2'


def expected(directory: Path) -> dict[str, torch.Tensor]:
    want: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        want.update(load_file(f))
    return want


def hold_the_tail(size: int) -> object:
    """Stall the GETs of the file's last 2 MiB: the load cannot be ready for 3 s."""

    def fault(req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        start = int(req.headers["range"].removeprefix("bytes=").split("-")[0])
        return Fault(stall=3.0) if start >= size - (2 << 20) else None

    return fault


def test_tensors_are_handed_out_before_the_last_range_is_fetched(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    [path] = write_model(tmp_path / "m", 12 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    with (
        CountingProxy(s3.endpoint, fault=hold_the_tail(path.stat().st_size)) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=CONFIG
        ) as d,
        d.client() as client,
        d.client() as operator,
    ):
        got: dict[str, torch.Tensor] = {}
        state_at_first: list[str] = []
        stream = client.stream(uri)
        for name, tensor in stream:
            if not got:
                state_at_first.extend(m.state for m in operator.list())
            assert name not in got
            got[name] = tensor.clone()
        # The first tensor came while the tail was still held back by the proxy.
        assert state_at_first == ["loading"]
        assert_same_tensors(got, expected(tmp_path / "m"))
        model = stream.model
        assert not model.attached
        assert_same_tensors(model.tensors, got)
        assert [m.leases for m in operator.list()] == [1]
        model.close()
        del model, stream, tensor
        # A second stream of the resident model gets everything at its ready event.
        gets = proxy.stats().requests[Kind.DATA_GET]
        again = client.stream(uri)
        assert_same_tensors(dict(again), got)
        assert again.model.attached
        assert proxy.stats().requests[Kind.DATA_GET] == gets
        again.model.close()
        del again
        assert_clean(d)


def test_a_stream_joining_a_load_in_progress_gets_what_landed_before(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    [path] = write_model(tmp_path / "m", 8 << 20, layer_bytes=1 << 20, seed=3)
    uri = upload(s3, tmp_path / "m", prefix)
    want = expected(tmp_path / "m")
    with (
        CountingProxy(s3.endpoint, fault=hold_the_tail(path.stat().st_size)) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=CONFIG
        ) as d,
    ):

        async def rank(first: asyncio.Event, after: asyncio.Event | None) -> list[object]:
            if after is not None:
                await after.wait()
            async with AsyncClient(d.socket) as client:
                got: dict[str, torch.Tensor] = {}
                stream = client.stream(uri)
                async for name, tensor in stream:
                    got[name] = tensor.clone()
                    first.set()
                attached = stream.model.attached
                stream.model.close()
                return [got, attached]

        async def two_ranks() -> list[list[object]]:
            first = asyncio.Event()
            return list(await asyncio.gather(rank(first, None), rank(asyncio.Event(), first)))

        (got_a, attached_a), (got_b, attached_b) = asyncio.run(two_ranks())
        assert isinstance(got_a, dict)
        assert isinstance(got_b, dict)
        assert_same_tensors(got_a, want)
        assert_same_tensors(got_b, want)
        # The second joined the first's load (not a resident model), and nothing was
        # fetched twice.
        assert (attached_a, attached_b) == (False, False)
        assert proxy.stats().body_bytes[Kind.DATA_GET] <= path.stat().st_size
        assert_clean(d)
