"""A GPU mapping whose last view the garbage collector finalizes is never synchronized or
closed from the finalizer (issue #27, defect 5): that may run inside an engine's CUDA graph
capture. The close (a device synchronize, then the IPC close) waits for an explicit point:
``LoadedModel.close()``, ``close_released()``, the next load."""

from __future__ import annotations

import gc
from pathlib import Path

from tensorferry.client import Client
from tensorferry.client._cuda import close_released
from tensorferry.cuda.fake import FakeCudaApi
from tests._cuda_fake_helpers import GPU_A, GPU_B
from tests._cuda_helpers import wait_for
from tests.conftest import Daemon
from tests.test_cuda_e2e import fake_daemon, model_dir  # noqa: F401 (fixtures)


def test_a_finalizer_queues_the_close_without_a_device_synchronize(
    fake_daemon: Daemon,  # noqa: F811
    model_dir: Path,  # noqa: F811
) -> None:
    api = FakeCudaApi.from_uuids([GPU_A, GPU_B])
    try:
        with Client(fake_daemon.socket, cuda=api) as client:
            model = client.load(str(model_dir), device="cuda:1")
            tensors = model.tensors
            del model  # no close(): only the garbage collector ends the views
            del tensors
            gc.collect()
            assert api.synchronized == []
            assert api.open_imports == 1  # still mapped, and the lease still held
            assert [m.leases for m in client.list()] == [1]
            assert close_released() == 1
            assert api.synchronized == [1]
            assert api.open_imports == 0
            wait_for(lambda: [m.leases for m in client.list()] == [0])
            # An explicit close at the end of a load closes at once.
            loaded = client.load(str(model_dir), device="cuda:1")
            assert loaded.attached
            loaded.close()
            assert api.open_imports == 0
            assert api.synchronized == [1, 1]
            wait_for(lambda: [m.leases for m in client.list()] == [0])
    finally:
        api.close()


def test_closing_the_client_closes_mappings_whose_views_the_collector_took(
    fake_daemon: Daemon,  # noqa: F811
    model_dir: Path,  # noqa: F811
) -> None:
    import asyncio

    from tensorferry.client import AsyncClient, close_released_gpu_mappings

    api = FakeCudaApi.from_uuids([GPU_A, GPU_B])
    try:
        with Client(fake_daemon.socket, cuda=api) as client:
            tensors = client.load(str(model_dir), device="cuda:1").tensors
            del tensors
            gc.collect()
            assert api.open_imports == 1  # queued by the finalizer
        assert api.open_imports == 0  # closed by Client.close()
        assert api.synchronized == [1]

        async def load_and_close() -> None:
            async with AsyncClient(fake_daemon.socket, cuda=api) as aclient:
                model = await aclient.load(str(model_dir), device="cuda:1")
                tensors = model.tensors
                del model, tensors
                gc.collect()
                assert api.open_imports == 1
            assert api.open_imports == 0  # closed by AsyncClient.close()

        asyncio.run(load_and_close())
        assert api.synchronized == [1, 1]
        with fake_daemon.client() as client:
            wait_for(lambda: [m.leases for m in client.list()] == [0])
        assert close_released_gpu_mappings() == 0  # the public name: nothing left
    finally:
        api.close()
