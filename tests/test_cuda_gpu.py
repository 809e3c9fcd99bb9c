"""The real CUDA path (cupy): a daemon subprocess and worker processes on one GPU.

Marked ``gpu``; skipped without a CUDA device or without cupy. Run on a GPU host with
``.venv/bin/pytest -m gpu tests/test_cuda_gpu.py``. The worker checks every tensor's
bytes against ``safetensors.torch.load_file(device="cuda:0")``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests._cuda_helpers import visible_device, wait_for, worker, write_odd_model
from tests.conftest import Daemon, daemon_env, running_daemon


def _missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("cupy") is None:
        return "needs cupy in this environment: pip install 'tensorferry[cuda12]' (or [cuda13])"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
MODEL_BYTES = 256 << 20
#: GPU memory that may differ from the baseline after eviction (allocator bookkeeping).
SLACK = 64 << 20
GPU_CONFIG = """
[cuda]
api = "cupy"
ring_slots = 16
reserve = "1GiB"
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu-models")
    write_odd_model(root / "m", MODEL_BYTES)
    return root


@pytest.fixture
def gpu_daemon(model_dir: Path) -> Iterator[Daemon]:
    with running_daemon(daemon_env(None), allow=[str(model_dir)], extra_config=GPU_CONFIG) as d:
        yield d


def gpu_uuid() -> str:
    return visible_device(torch.cuda.get_device_properties(0).uuid)


def free_memory() -> int:
    return int(torch.cuda.mem_get_info(0)[0])


def test_bf16_fp8_int8_bytes_and_two_workers_share_one_arena(
    gpu_daemon: Daemon, model_dir: Path
) -> None:
    uri, src = str(model_dir / "m"), model_dir / "m"
    # The workers name the GPU by UUID; the daemon sees every GPU: cuda:N must resolve.
    env = {"CUDA_VISIBLE_DEVICES": gpu_uuid()}
    with worker(gpu_daemon, uri, "cuda:0", src, env) as (first, _):
        assert first["device"] == "cuda:0"
        assert first["attached"] is False
        with worker(gpu_daemon, uri, "cuda:0", src, env) as (second, _):
            assert second["attached"] is True
            assert second["model_id"] == first["model_id"]
            with gpu_daemon.client() as client:
                (info,) = client.list()
                assert info.device == gpu_uuid()
                assert info.leases == 2


def test_release_and_evict_return_gpu_memory_to_baseline(
    gpu_daemon: Daemon, model_dir: Path
) -> None:
    uri, src = str(model_dir / "m"), model_dir / "m"
    baseline = free_memory()  # the daemon's context and ring exist already
    with worker(gpu_daemon, uri, "cuda:0", src, {}) as (report, _):
        assert baseline - free_memory() >= MODEL_BYTES
    with gpu_daemon.client() as client:
        wait_for(lambda: client.list()[0].leases == 0)
        client.evict(str(report["model_id"]))
        assert client.list() == []
    wait_for(lambda: free_memory() >= baseline - SLACK)


def test_a_sigkilled_workers_lease_is_dropped(gpu_daemon: Daemon, model_dir: Path) -> None:
    uri, src = str(model_dir / "m"), model_dir / "m"
    baseline = free_memory()
    with worker(gpu_daemon, uri, "cuda:0", src, {}) as (report, proc):
        with gpu_daemon.client() as client:
            assert client.list()[0].leases == 1
        proc.kill()
        proc.wait(10)
    with gpu_daemon.client() as client:
        wait_for(lambda: client.list()[0].leases == 0)
        client.evict(str(report["model_id"]))
        assert client.list() == []
    wait_for(lambda: free_memory() >= baseline - SLACK)


def test_opening_a_handle_in_the_exporting_process_fails() -> None:
    from tensorferry.cuda import CudaError
    from tensorferry.cuda.cupy_api import CupyCudaApi

    api = CupyCudaApi()
    mem = api.malloc(0, 2 << 20)
    try:
        handle = api.ipc_get_handle(mem)
        assert len(handle) == 64
        with pytest.raises(CudaError):
            api.ipc_open(handle, 0)
    finally:
        api.free(mem)
