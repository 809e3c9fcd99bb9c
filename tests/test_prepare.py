"""`tensorferry prepare` and prepared-artifact loads through the daemon: round trips,
shards, selections, checksums (at rest and in transit) and a malformed manifest in the
store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from safetensors.torch import load_file

from tensorferry.cli import main as cli_main
from tensorferry.daemon.planner import align_up
from tensorferry.devtools.modelgen import write_all_dtypes, write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import DataLoss, InvalidArtifact, InvalidRequest
from tensorferry.format.manifest import MANIFEST_NAME
from tensorferry.prepare.shardplan import parse_shard_plan
from tests._prepare_helpers import (
    ALIGN,
    SHARD_PLAN,
    data_bytes,
    prepare_env,
    read_manifest,
    run_prepare,
    shard_of,
    sharded_model,
    use_s3_directly,
)
from tests.conftest import BUCKET, Daemon, assert_same_tensors, upload


@pytest.fixture(scope="module")
def env(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One counting proxy and one daemon behind it for the module; loads differ by prefix."""
    yield from prepare_env(s3, tmp_path_factory)


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_s3_directly(s3, monkeypatch)


def test_round_trip_every_dtype(
    s3: S3Server, env: dict[str, Any], tmp_path: Path, prefix: str, aws: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    src = tmp_path / "m"
    write_all_dtypes(src)
    (src / "config.json").write_text('{"model_type": "generated"}')
    (src / "tokenizer.json").write_bytes(b"t" * 5000)
    (src / "pytorch_model.bin").write_bytes(b"not copied")
    want = load_file(src / "model.safetensors")
    plain = upload(s3, src, prefix + "plain/")
    dst = f"s3://{BUCKET}/{prefix}prepared/"
    assert cli_main(["prepare", str(src), dst, "-q"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"prepared {src} -> {dst}: 54 tensors, 0.000 GB in 1 data objects, "
                          "2 files, tp 1, in ")  # fmt: skip
    assert (
        err
        == "tensorferry prepare: not copied (another weight format or name): pytorch_model.bin\n"
    )
    first = read_manifest(s3, prefix + "prepared/")
    # Idempotent, and the same whichever way the bytes travel: S3 -> local gives it too.
    run_prepare(str(src), dst)
    assert read_manifest(s3, prefix + "prepared/") == first
    local = env["local"] / prefix.rstrip("/")
    run_prepare(plain, str(local))
    assert (local / MANIFEST_NAME).read_bytes() == first
    d: Daemon = env["daemon"]
    with d.client() as client:
        for uri in (dst, str(local), plain):
            with client.load(uri) as model:
                assert_same_tensors(model.tensors, want)
        with client.load(dst) as model:
            assert model.files == ["config.json", "tokenizer.json"]
        assert client.read_file(dst, "tokenizer.json") == b"t" * 5000
        with pytest.raises(InvalidRequest) as info:
            client.load(dst, rank=1, world_size=2)
        assert info.value.message == (
            f"{dst} was prepared without a shard plan: load it without rank/world_size, or "
            "prepare it with --shard-plan FILE --tp 2"
        )
        with pytest.raises(InvalidRequest) as info:
            client.load(plain, rank=0, world_size=2)
        assert info.value.message == (
            f"{plain} is plain safetensors: rank/world_size need an artifact made by "
            "`tensorferry prepare SRC DST --shard-plan FILE --tp 2`; load the whole model "
            "without rank/world_size"
        )


def test_shards_equal_slices_of_the_full_tensors(
    s3: S3Server, env: dict[str, Any], tmp_path: Path, prefix: str, aws: None
) -> None:
    full = sharded_model(tmp_path / "m")
    (tmp_path / "plan.toml").write_text(SHARD_PLAN)
    plan = parse_shard_plan(SHARD_PLAN, "plan.toml")
    proxy: CountingProxy = env["proxy"]
    with env["daemon"].client() as client:
        for world in (2, 4):
            dst = f"s3://{BUCKET}/{prefix}tp{world}/"
            m = run_prepare(str(tmp_path / "m"), dst, plan=plan, world_size=world,
                            chunk_size=64 << 10)  # fmt: skip
            assert [o.name for o in m.objects] == ["tensorferry.data.shared"] + [
                f"tensorferry.data.rank-{r:05d}-of-{world:05d}" for r in range(world)
            ]
            manifest_size = len(read_manifest(s3, f"{prefix}tp{world}/"))
            for rank in range(world):
                proxy.reset()
                with client.load(dst, rank=rank, world_size=world) as model:
                    want = {k: shard_of(k, v, rank, world) for k, v in full.items()}
                    assert_same_tensors(model.tensors, want)
                bound = sum(align_up(t.nbytes, ALIGN) for t in want.values())
                fetched = data_bytes(proxy, manifest_size)
                assert sum(t.nbytes for t in want.values()) <= fetched <= bound
            proxy.reset()
            select = ["*.qkv_proj.weight", "*.post_norm.weight"]
            with client.load(dst, select=select, rank=world - 1, world_size=world) as model:
                names = ("layers.0.self_attn.qkv_proj.weight", "layers.0.post_norm.weight")
                want = {k: shard_of(k, full[k], world - 1, world) for k in names}
                assert_same_tensors(model.tensors, want)
            assert data_bytes(proxy, manifest_size) <= sum(
                align_up(t.nbytes, ALIGN) for t in want.values()
            )
        with pytest.raises(InvalidRequest) as info:
            client.load(dst)
        assert info.value.message == (
            f"{dst} was prepared for tensor parallelism 4: load it with world_size=4 and a "
            "rank 0..3"
        )
    # A bad plan fails before anything is written, with the rule and the tensor named.
    bad_plan = parse_shard_plan(SHARD_PLAN.replace("[96, 96]", "[96, 95]"), "bad.toml")
    with pytest.raises(InvalidRequest) as bad:
        run_prepare(str(tmp_path / "m"), str(tmp_path / "out"), world_size=2, plan=bad_plan)
    assert bad.value.message == (
        "bad.toml: shard rule 2: fused sizes [96, 95] add up to 191, but dim 0 of "
        "'layers.0.mlp.gate_up_proj.weight' (shape [192, 256]) has 192"
    )


def test_selection_fetches_only_selected_slices(
    s3: S3Server, env: dict[str, Any], tmp_path: Path, prefix: str, aws: None
) -> None:
    write_model(tmp_path / "m", 8 << 20, shards=2, layer_bytes=1 << 20)
    full: dict[str, torch.Tensor] = {}
    for f in sorted((tmp_path / "m").glob("*.safetensors")):
        full.update(load_file(f))
    dst = f"s3://{BUCKET}/{prefix}"
    run_prepare(str(tmp_path / "m"), dst, chunk_size=256 << 10)
    manifest_size = len(read_manifest(s3, prefix))
    select = ["layers.1.*", "layers.4.weight", "layers.7.bias"]
    want = {k: v for k, v in full.items() if k.startswith("layers.1.") or k in select}
    proxy: CountingProxy = env["proxy"]
    with env["daemon"].client() as client:
        proxy.reset()
        with client.load(dst, select=select) as model:
            assert_same_tensors(model.tensors, want)
        fetched = data_bytes(proxy, manifest_size)
        assert sum(t.nbytes for t in want.values()) <= fetched
        assert fetched <= sum(align_up(t.nbytes, ALIGN) for t in want.values())
        with pytest.raises(InvalidRequest) as info:
            client.load(dst, select=["layers.1.*", "nope.*"])
        assert info.value.message == f"{dst}: selection 'nope.*' matches no tensor"


def test_corruption_in_transit_is_refetched_at_rest_is_data_loss(
    s3: S3Server, env: dict[str, Any], tmp_path: Path, prefix: str, aws: None
) -> None:
    write_model(tmp_path / "m", 2 << 20, layer_bytes=1 << 19)
    want = load_file(tmp_path / "m" / "model.safetensors")
    dst = f"s3://{BUCKET}/{prefix}"
    m = run_prepare(str(tmp_path / "m"), dst, chunk_size=64 << 10)
    proxy: CountingProxy = env["proxy"]
    flipped: list[RequestInfo] = []

    def flip_once(req: RequestInfo) -> Fault | None:
        if flipped or "tensorferry.data" not in req.path or req.method != "GET":
            return None
        flipped.append(req)
        return Fault(flip_byte_at=100)

    d: Daemon = env["daemon"]
    with d.client() as client:
        proxy.set_fault(flip_once)
        try:
            with client.load(dst) as model:
                assert_same_tensors(model.tensors, want)
        finally:
            proxy.set_fault(None)
        assert len(flipped) == 1
        record = client.status().recent_loads[-1]
        assert (record.outcome, record.retries, dict(record.retry_causes)) == (
            "ready",
            1,
            {"checksum": 1},
        )
        client.evict(dst)
        # At rest: one byte of the stored object changes; every read gets the same bytes.
        key = prefix + "tensorferry.data.shared"
        data = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
        target = next(t.slices[0] for t in m.tensors if t.slices[0].nbytes > 4 * (64 << 10))
        at = target.offset + 3 * (64 << 10) + 5
        data[at] ^= 0x55
        s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
        chunk = target.offset + 3 * (64 << 10)
        length = min(64 << 10, target.offset + target.nbytes - chunk)
        with pytest.raises(DataLoss) as info:
            client.load(dst)
        assert info.value.message == (
            f"{dst}tensorferry.data.shared: the chunk at byte {chunk} ({length} bytes) failed "
            "its crc32c check 3 times: the stored artifact is corrupt; run `tensorferry "
            "prepare` again to rewrite it"
        )
        assert [x.uri for x in client.list()].count(dst) == 0
        assert sorted(client.status().arenas) == d.segments()


def test_malformed_manifest_in_the_store(s3: S3Server, env: dict[str, Any], prefix: str) -> None:
    client_s3 = s3.client()
    client_s3.put_object(Bucket=BUCKET, Key=prefix + "tensorferry.data.shared", Body=b"x" * 64)
    doc = msgpack.unpackb(
        msgpack.packb({"format": "tensorferry.daemon.planner_prepared", "version": 2})
    )
    client_s3.put_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME, Body=msgpack.packb(doc))
    uri = f"s3://{BUCKET}/{prefix}"
    d: Daemon = env["daemon"]
    with d.client() as client:
        before = client.status().resident_bytes
        with pytest.raises(InvalidArtifact) as info:
            client.load(uri)
        assert info.value.message == (
            f"{uri}{MANIFEST_NAME} has format version 2, newer than this daemon reads (1): "
            "upgrade tensorferry on this host, or prepare the artifact with the version the "
            "daemon runs"
        )
        assert client.status().resident_bytes == before
