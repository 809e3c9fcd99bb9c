"""`tensorferry prepare` and prepared-artifact loads: round trips, shards, selections,
checksums (at rest and in transit), malformed manifests, kills and bounded memory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hypothesis.strategies as st
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file

from tensorferry.cli import main as cli_main
from tensorferry.daemon.manifest import MANIFEST_NAME, Manifest
from tensorferry.daemon.pipeline import load_plan
from tensorferry.daemon.planner import align_up
from tensorferry.daemon.prepare import prepare
from tensorferry.daemon.prepare.run import PARTS_IN_FLIGHT, READ_AHEAD, Options
from tensorferry.daemon.prepare.shardplan import parse_shard_plan
from tensorferry.daemon.prepared import plan_prepared_load
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.devtools.modelgen import random_tensor, write_all_dtypes, write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import DataLoss, InvalidArtifact, InvalidRequest, TensorferryError
from tests.conftest import BUCKET, Daemon, assert_same_tensors, running_daemon, upload

ALIGN = 4096
SHARD_PLAN = """
version = 1
[[shard]]
match = "*.qkv_proj.*"
split = "column"
fused = [128, 64, 64]
[[shard]]
match = "*.gate_up_proj.weight"
split = "column"
fused = [96, 96]
[[shard]]
match = ["*.o_proj.weight", "*.down_proj.weight"]
split = "row"
[[shard]]
match = "*.experts.weight"
dim = -2
[[shard]]
match = "*.post_norm.weight"
split = "none"
[[shard]]
match = "model.embed_tokens.weight"
split = "column"
"""
# name -> (dim, parts) as the plan above splits it; anything else is replicated.
SPLITS = {
    "layers.0.self_attn.qkv_proj.weight": (0, [128, 64, 64]),
    "layers.0.self_attn.qkv_proj.bias": (0, [128, 64, 64]),
    "layers.0.mlp.gate_up_proj.weight": (0, [96, 96]),
    "layers.0.self_attn.o_proj.weight": (1, [128]),
    "layers.0.mlp.down_proj.weight": (1, [96]),
    "layers.0.experts.weight": (1, [6]),
    "model.embed_tokens.weight": (0, [10]),
}


@pytest.fixture(scope="module")
def env(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One counting proxy and one daemon behind it for the module; loads differ by prefix."""
    local = tmp_path_factory.mktemp("prepared")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TENSORFERRY_"))}
    with CountingProxy(s3.endpoint) as proxy:
        daemon_env = {
            **base,
            **s3.env(),
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        allow = [f"s3://{BUCKET}/", str(local)]
        with running_daemon(daemon_env, allow=allow, s3_config='chunk_size = "256KiB"') as d:
            yield {"proxy": proxy, "daemon": d, "local": local}


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process prepare talks to SeaweedFS directly."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)


def run_prepare(src: str, dst: str, **kwargs: Any) -> Manifest:
    return asyncio.run(prepare(Options(src=src, dst=dst, **kwargs))).manifest


def data_bytes(proxy: CountingProxy, manifest_size: int) -> int:
    # Ranges that start at byte 0 and end below 1 MiB count as header GETs, the manifest too.
    body = proxy.stats().body_bytes
    return body[Kind.DATA_GET] + body[Kind.HEADER_GET] - manifest_size


def read_manifest(s3: S3Server, prefix: str) -> bytes:
    body = s3.client().get_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME)["Body"]
    return bytes(body.read())


def sharded_model(directory: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)

    def t(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return random_tensor(shape, dtype, gen)

    first = {
        "model.embed_tokens.weight": t((10, 256), torch.bfloat16),  # TP=4: 3, 3, 2, 2 rows
        "layers.0.input_layernorm.weight": t((256,), torch.float32),  # no rule: replicated
        "layers.0.self_attn.qkv_proj.weight": t((256, 256), torch.float16),  # fused Q, K, V
        "layers.0.self_attn.qkv_proj.bias": t((256,), torch.float16),
        "layers.0.self_attn.o_proj.weight": t((256, 128), torch.float32),  # row parallel
    }
    second = {
        "layers.0.mlp.gate_up_proj.weight": t((192, 256), torch.bfloat16),  # fused gate, up
        "layers.0.mlp.down_proj.weight": t((256, 96), torch.float8_e4m3fn),
        "layers.0.experts.weight": t((4, 6, 64), torch.int8),  # dim 1, TP=4: 2, 2, 1, 1
        "layers.0.post_norm.weight": t((256,), torch.bfloat16),
    }
    directory.mkdir(parents=True)
    save_file(first, str(directory / "model-00001-of-00002.safetensors"))
    save_file(second, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return first | second


def shard_of(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if name not in SPLITS:
        return full
    dim, parts = SPLITS[name]
    raw = full.view(torch.uint8) if full.dtype == torch.float8_e4m3fn else full
    pieces = [torch.tensor_split(p, world, dim)[rank] for p in torch.split(raw, parts, dim)]
    return torch.cat(pieces, dim).contiguous().view(full.dtype)


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


class MemoryStore(Store):
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.uri = "s3://mem/model/"
        self.objects = objects

    async def list_objects(self) -> list[ObjectInfo]:
        return [ObjectInfo(k, len(v), k) for k, v in sorted(self.objects.items())]

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        return self.objects[obj.key][start : start + length]

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        dest[:] = self.objects[obj.key][start : start + len(dest)]


class SpySink:
    def __init__(self) -> None:
        self.allocations: list[int] = []

    def allocate(self, size: int, what: str) -> Any:
        self.allocations.append(size)
        raise AssertionError("an arena was allocated for a malformed manifest")


@pytest.fixture(scope="module")
def valid_artifact(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("valid")
    sharded_model(root / "m")
    plan = parse_shard_plan(SHARD_PLAN, "plan.toml")
    run_prepare(str(root / "m"), str(root / "out"), plan=plan, world_size=2)
    return {p.name: p.read_bytes() for p in (root / "out").iterdir()}


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, doc
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        yield from _nodes(value, (*path, key))


# Per field: values that are always wrong for it (and would be for any valid manifest).
WRONG = [None, True, 1.5, "x", b"x", [], {}, -2, (1 << 64) - 1]
WRONG_FOR = {
    "split": [True, 1.5, "x", b"x", [], {}, -2],
    "crc32c": [b"abc", 7, None],
    "name": [None, True, 1.5, b"x", [], {}, -2, (1 << 64) - 1, ""],
    "files": [None, True, 1.5, "x", b"x", {}, -2, (1 << 64) - 1],
}
SHIFTS = {"offset": 1, "nbytes": 1, "size": -1, "version": 1, "world_size": 1}


@st.composite
def malformed(draw: st.DrawFn, valid: bytes) -> bytes:
    doc = msgpack.unpackb(valid)
    kind = draw(st.sampled_from(["bytes", "truncate", "drop", "wrong", "shift", "overlap"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    fields = [(p, v) for p, v in _nodes(doc) if p and isinstance(p[-1], str)]
    if kind == "shift":
        fields = [
            (p, v)
            for p, v in fields
            if p[-1] in SHIFTS and isinstance(v, int) and (p[-1] != "size" or p[0] == "objects")
        ]
    path, value = draw(st.sampled_from(fields))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "drop":
        del parent[path[-1]]
    elif kind == "wrong":
        parent[path[-1]] = draw(st.sampled_from(WRONG_FOR.get(path[-1], WRONG)))
    elif kind == "shift":
        parent[path[-1]] = value + SHIFTS[path[-1]]
    else:  # two non-empty slices of one object at one offset
        slices = [s for t in doc["tensors"] for s in t["slices"] if s["nbytes"] and not s["object"]]
        a, b = draw(st.permutations(slices))[:2]
        b["offset"] = a["offset"]
    return msgpack.packb(doc)


async def _load_with_spy(objects: dict[str, bytes], sink: SpySink) -> None:
    store = MemoryStore(objects)
    listing = await store.list_objects()
    plan = await plan_prepared_load(
        store, store.uri, listing, chunk_size=1 << 20, rank=1, world_size=2
    )
    noop = lambda _: None  # noqa: E731
    await load_plan(store, plan, store.uri, sink, concurrency=4, on_plan=noop, progress=noop)


def test_malformed_manifests_are_refused_before_any_arena(valid_artifact: dict[str, bytes]) -> None:
    with pytest.raises(AssertionError, match="an arena was allocated"):
        asyncio.run(_load_with_spy(valid_artifact, SpySink()))  # the valid one gets that far
    huge = {**valid_artifact, MANIFEST_NAME: b""}

    class Huge(MemoryStore):
        async def list_objects(self) -> list[ObjectInfo]:
            return [o if o.key != MANIFEST_NAME else ObjectInfo(o.key, 300 << 20, "x")
                    for o in await super().list_objects()]  # fmt: skip

    store = Huge(huge)
    with pytest.raises(InvalidArtifact) as info:
        asyncio.run(plan_prepared_load(store, store.uri, asyncio.run(store.list_objects()),
                                       chunk_size=1 << 20))  # fmt: skip
    assert info.value.message == (
        "s3://mem/model/tensorferry.manifest.msgpack has 314572800 bytes, more than a "
        "manifest may have (268435456); it is not a tensorferry manifest"
    )

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(malformed(valid_artifact[MANIFEST_NAME]))
    def check(raw: bytes) -> None:
        sink = SpySink()
        with pytest.raises(TensorferryError) as info:
            asyncio.run(_load_with_spy({**valid_artifact, MANIFEST_NAME: raw}, sink))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value.message
        assert sink.allocations == []

    check()


def test_malformed_manifest_in_the_store(s3: S3Server, env: dict[str, Any], prefix: str) -> None:
    client_s3 = s3.client()
    client_s3.put_object(Bucket=BUCKET, Key=prefix + "tensorferry.data.shared", Body=b"x" * 64)
    doc = msgpack.unpackb(msgpack.packb({"format": "tensorferry.prepared", "version": 2}))
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
