"""What a resident model is, and what Evict does to one (issue #14: 1, 8, 11, 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import ModelEvicted
from tensorferry.v1 import tensorferry_pb2 as pb
from tests.conftest import (
    BUCKET,
    Daemon,
    assert_clean,
    daemon_env,
    eventually,
    running_daemon,
    upload,
)

SLOW = 'chunk_size = "1MiB"\nconcurrency = 2'


def slow_data(req: RequestInfo) -> Fault | None:
    return Fault(stall=0.25) if req.kind is Kind.DATA_GET else None


def test_evict_during_a_cold_load_refuses_its_waiters_and_frees_the_arena(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 12 << 20, layer_bytes=1 << 20)
    uri = upload(s3, tmp_path / "m", prefix)
    with (
        CountingProxy(s3.endpoint, fault=slow_data) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=SLOW
        ) as d,
        d.client() as client,
        d.client() as operator,
    ):
        answers: list[pb.EvictResponse] = []
        seen: list[pb.ModelInfo] = []

        def evict_at_first_fetch(stage: str, done: int, total: int) -> None:
            if stage == "fetch" and not answers:
                seen.extend(operator.list())
                answers.append(operator.evict(uri, "operator alice"))

        with pytest.raises(ModelEvicted) as info:
            client.load(uri, progress=evict_at_first_fetch)
        [answer] = answers
        assert (list(answer.evicted), answer.pending_leases, answer.refused_waiters) == (
            [seen[0].model_id], 0, 1,
        )  # fmt: skip
        # ModelInfo counts the request waiting for a loading model.
        assert (seen[0].state, seen[0].leases, seen[0].waiting) == ("loading", 0, 1)
        assert info.value.code.name == "ABORTED"
        assert info.value.message == (
            f"{uri} was evicted by operator alice before it was ready (model "
            f"{answer.evicted[0]}); load it again"
        )
        assert client.list() == []
        eventually(lambda: d.segments() == [], "the evicted load's arena is freed")
        eventually(
            lambda: [r.outcome for r in client.status().recent_loads] == ["cancelled"],
            "the load is recorded as cancelled",
        )
        # The next load fetches afresh and succeeds.
        proxy.set_fault(None)
        with client.load(uri) as model:
            assert not model.attached
        assert_clean(d)


@pytest.mark.parametrize(
    "spelling",
    ["{dir}", "file://{dir}/", "file://{dir}", "{dir}/model.safetensors", "{s3}", "{s3}/"],
)
def test_evict_normalises_uris_as_load_does(
    s3: S3Server, tmp_path: Path, prefix: str, spelling: str
) -> None:
    root = tmp_path / "models"
    write_model(root, 1 << 20, layer_bytes=256 << 10)
    s3_uri = upload(s3, root, prefix).rstrip("/")
    allow = [f"s3://{BUCKET}/", str(root)]
    with running_daemon(daemon_env(s3), allow=allow) as d, d.client() as client:
        loaded = s3_uri + "/" if "{s3}" in spelling else str(root) + "/"
        client.preload(loaded)
        answer = client.evict(spelling.format(dir=root, s3=s3_uri))
        assert len(answer.evicted) == 1
        assert client.list() == []


def load_stages(d: Daemon, uri: str, **kwargs: object) -> tuple[list[str], bool]:
    seen: list[str] = []
    with d.client() as client:
        progress = lambda stage, done, total: seen.append(stage)  # noqa: E731
        with client.load(uri, progress=progress, **kwargs) as model:  # type: ignore[arg-type]
            attached = model.attached
    return seen, attached


def test_equivalent_requests_share_one_resident_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, 1 << 20, layer_bytes=128 << 10)
    with running_daemon(daemon_env(None), allow=[str(root)]) as d, d.client() as client:
        # Patterns that pick the same tensors, in any order, repeated.
        with client.load(str(root), select=["layers.*"]) as first:
            assert not first.attached
        for select in (["layers.*", "layers.0.*"], ["layers.1.*", "layers.*"], ["*"], []):
            stage_list, attached = load_stages(d, str(root), select=select)
            assert attached, select
            assert stage_list == ["plan", "attach"], select
        # A directory and its single model.safetensors, with or without file://.
        for uri in (f"{root}/model.safetensors", f"file://{root}", f"{root}/"):
            _, attached = load_stages(d, uri)
            assert attached, uri
        [model] = client.list()
        assert model.uri == f"{root}/"
        # Another tensor set is another model.
        with client.load(str(root), select=["layers.0.*"]) as other:
            assert not other.attached
            assert sorted(other.tensors) == ["layers.0.bias", "layers.0.weight"]
        assert len(client.list()) == 2


def test_a_file_uri_loads_that_file_only(tmp_path: Path) -> None:
    root = tmp_path / "two"
    write_model(root / "a", 256 << 10, layer_bytes=128 << 10, seed=1)
    write_model(root / "b", 256 << 10, layer_bytes=128 << 10, seed=2)
    (root / "a" / "model.safetensors").rename(root / "a.safetensors")
    (root / "b" / "model.safetensors").rename(root / "b.safetensors")
    with running_daemon(daemon_env(None), allow=[str(root)]) as d, d.client() as client:
        from safetensors.torch import load_file

        want = load_file(root / "a.safetensors")
        with client.load(f"{root}/a.safetensors") as model:
            assert sorted(model.tensors) == sorted(want)
            assert model.total_bytes == sum(t.nbytes for t in want.values())


def test_editing_config_json_keeps_the_resident_weights(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write_model(root, 256 << 10, layer_bytes=128 << 10)
    with running_daemon(daemon_env(None), allow=[str(root)]) as d, d.client() as client:
        client.preload(str(root))
        (root / "config.json").write_text('{"model_type": "edited"}')
        (root / "tokenizer.json").write_text("{}")
        _, attached = load_stages(d, str(root))
        assert attached
        assert len(client.list()) == 1


def test_status_reports_the_effective_shm_budget(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write_model(root, 256 << 10, layer_bytes=128 << 10)
    with running_daemon(daemon_env(None), allow=[str(root)]) as d, d.client() as client:
        assert client.status().shm_budget_bytes > 1 << 20  # MemAvailable, not 0
    budget = '[memory]\nshm_budget = "64MiB"'
    with (
        running_daemon(daemon_env(None), allow=[str(root)], extra_config=budget) as d,
        d.client() as client,
    ):
        assert client.status().shm_budget_bytes == 64 << 20


def test_equivalent_selections_of_a_prepared_artifact_share_one_model(tmp_path: Path) -> None:
    import asyncio

    from tensorferry.prepare import Options, prepare

    write_model(tmp_path / "src", 1 << 20, layer_bytes=128 << 10)
    dst = tmp_path / "prepared"
    asyncio.run(prepare(Options(src=str(tmp_path / "src"), dst=str(dst), chunk_size=256 << 10)))
    with running_daemon(daemon_env(None), allow=[str(dst)]) as d, d.client() as client:
        with client.load(str(dst), select=["layers.1.*"]) as first:
            assert sorted(first.tensors) == ["layers.1.bias", "layers.1.weight"]
        stage_list, attached = load_stages(d, str(dst), select=["layers.1.bias", "layers.1.*"])
        assert (stage_list, attached) == (["plan", "attach"], True)
        assert len(client.list()) == 1
