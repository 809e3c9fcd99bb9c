"""End to end on the fake CUDA API: a real daemon subprocess, real worker processes.

The daemon runs ``[cuda] api = "fake"`` with two fake GPUs; workers see them through
$TENSORFERRY_FAKE_CUDA in another order (as with a different CUDA_VISIBLE_DEVICES), so
``cuda:N`` must be resolved by UUID. Device memory is /dev/shm files the worker maps.
"""

from __future__ import annotations

import asyncio
import gc
import glob
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorferry.client import AsyncClient, Client, InvalidRequest
from tensorferry.client._cuda import close_released
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.errors import FailedPrecondition
from tests._cuda_helpers import wait_for, worker, write_odd_model
from tests.conftest import Daemon, assert_same_tensors, daemon_env, running_daemon
from tests.test_load import load_dir

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
GPU_C = "GPU-cccccccc-0000-4000-8000-000000000003"
FAKE_CUDA = f"""
[cuda]
api = "fake"
ring_slots = 4
slot_size = "64KiB"
reserve = 0
fake_jitter = 0.001
[[cuda.fake_devices]]
uuid = "{GPU_A}"
memory = "64MiB"
[[cuda.fake_devices]]
uuid = "{GPU_B}"
memory = "64MiB"
"""


def data_bytes(model: Path) -> int:
    files = list(model.glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    return sum(f.stat().st_size for f in files) - headers


def fake_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("tffakecuda.*")}


@pytest.fixture
def model_dir(local_root: Path) -> Path:
    write_odd_model(local_root / "m", 2 << 20)  # bf16, fp8, int8; unaligned in the file
    return local_root / "m"


@pytest.fixture
def fake_daemon(local_root: Path) -> Iterator[Daemon]:
    with running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=FAKE_CUDA) as d:
        yield d
        found = re.search(r"device memory files (\S+)\*", d.output())
        assert found is not None, d.output()
        prefix = found[1]
    # The daemon freed its fake device memory. (Its own files only: another test run on
    # this host may have fake devices of its own.)
    assert glob.glob(glob.escape(prefix) + "*") == []


def test_workers_share_one_gpu_arena_numbered_their_own_way(
    fake_daemon: Daemon, model_dir: Path
) -> None:
    uri = str(model_dir)
    # The workers' cuda:0 is GPU B, the daemon's cuda:1.
    env = {"TENSORFERRY_FAKE_CUDA": f"{GPU_B},{GPU_A}"}
    with worker(fake_daemon, uri, "cuda:0", model_dir, env) as (first, _):
        assert first["attached"] is False
        assert first["device"] == "cpu"  # the fake's "device memory" is host memory
        with worker(fake_daemon, uri, "cuda:0", model_dir, env) as (second, _):
            assert second["attached"] is True
            assert second["model_id"] == first["model_id"]
            with fake_daemon.client() as client:
                (info,) = client.list()
                assert (info.device, info.leases, info.state) == (GPU_B, 2, "ready")
    with fake_daemon.client() as client:
        wait_for(lambda: client.list()[0].leases == 0)
        before = fake_files()
        client.evict(str(first["model_id"]))
        assert client.list() == []
        assert len(before - fake_files()) == 1  # the arena's device memory is freed


async def async_load(daemon: Daemon, uri: str, api: FakeCudaApi, model_dir: Path) -> None:
    async with AsyncClient(daemon.socket, cuda=api) as client:
        model = await client.load(uri, device="cuda:0")
        assert model.attached
        assert_same_tensors(model.tensors, load_dir(model_dir))  # type: ignore[arg-type]
        del model
        gc.collect()
        close_released()  # the views' finalizer only queued the mapping's close


def test_preload_onto_two_gpus_fetches_once(fake_daemon: Daemon, model_dir: Path) -> None:
    uri = str(model_dir)
    api = FakeCudaApi.from_uuids([GPU_A, GPU_B])
    try:
        with Client(fake_daemon.socket, cuda=api) as client:
            client.preload(uri, device="cuda:0,cuda:1")
            models = client.list()
            assert sorted((m.device, m.state) for m in models) == [
                (GPU_A, "ready"), (GPU_B, "ready"),
            ]  # fmt: skip
            # One fetch of the data sections for both GPUs: one cold load, its bytes once.
            (record,) = [r for r in client.status().recent_loads if r.outcome == "ready"]
            assert record.bytes == data_bytes(model_dir)
            with client.load(uri, device="cuda:1") as model:
                assert model.attached
                assert_same_tensors(model.tensors, load_dir(model_dir))  # type: ignore[arg-type]
            gc.collect()
            assert api.open_imports == 0
            asyncio.run(async_load(fake_daemon, uri, api, model_dir))
            gc.collect()
            assert api.open_imports == 0
            with pytest.raises(InvalidRequest) as info:
                client.load(uri, device="cuda:0,cuda:1")
            assert info.value.message == (
                "device 'cuda:0,cuda:1': a Load holds one GPU; preload onto several GPUs (one "
                "fetch fills them all), then load each from its own worker"
            )
            wait_for(lambda: not any(m.leases for m in client.list()))
            client.evict(client.list()[0].uri)
    finally:
        api.close()


def test_a_gpu_the_daemon_does_not_see_is_failed_precondition(
    fake_daemon: Daemon, model_dir: Path
) -> None:
    api = FakeCudaApi.from_uuids([GPU_C])
    try:
        with Client(fake_daemon.socket, cuda=api) as client, pytest.raises(FailedPrecondition) as e:
            client.load(str(model_dir), device="cuda:0")
        assert e.value.message == (
            f"the worker's cuda:0 is {GPU_C}, a GPU the daemon does not see (it sees {GPU_A} "
            f"(its cuda:0), {GPU_B} (its cuda:1)); give the daemon that GPU "
            "(CUDA_VISIBLE_DEVICES, the container's device list) or load onto a GPU it sees"
        )
    finally:
        api.close()


def test_cuda_without_a_gpu_is_failed_precondition_and_cpu_loads_work(
    local_root: Path, model_dir: Path
) -> None:
    uri = str(model_dir)
    with running_daemon(daemon_env(None), allow=[str(local_root)]) as d:
        api = FakeCudaApi.from_uuids([GPU_A])
        try:
            # Whether or not the worker has a GPU (here: the fake), the daemon has none.
            for cuda in (None, api):
                with Client(d.socket, cuda=cuda) as client, pytest.raises(FailedPrecondition) as e:
                    client.load(uri, device="cuda:0")
                assert e.value.code.name == "FAILED_PRECONDITION"
                assert e.value.message == (
                    "device 'cuda:0': no CUDA device is visible to the daemon; load with "
                    "device='cpu' or run the daemon on a GPU host"
                )
        finally:
            api.close()
        with d.client() as client, client.load(uri) as model:
            assert_same_tensors(model.tensors, load_dir(model_dir))  # type: ignore[arg-type]
