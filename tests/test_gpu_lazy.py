"""CUDA opened lazily, per device (issue #27, defect 1): a daemon that serves CPU arenas
holds no context on any GPU; the first load onto a GPU opens that GPU only, once however
many loads ask at the same time. The fake CUDA API records the contexts it "created"."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from tensorferry.cuda import Stream
from tensorferry.cuda.fake import FakeCudaApi
from tests._cuda_fake_helpers import GPU_A, GPU_B, SLOT, runtime
from tests._cuda_helpers import worker
from tests.conftest import Daemon
from tests.test_cuda_e2e import fake_daemon, model_dir  # noqa: F401 (fixtures)


def held_contexts(daemon: Daemon) -> dict[str, tuple[bool, int, int]]:
    with daemon.client() as client:
        gpus = client.status().gpus
    return {g.uuid: (g.context, g.arena_bytes, g.ring_bytes) for g in gpus}


def test_a_cpu_only_daemon_holds_no_context_and_a_load_opens_its_gpu_only(
    fake_daemon: Daemon,  # noqa: F811
    model_dir: Path,  # noqa: F811
) -> None:
    with fake_daemon.client() as client:
        cpu = client.load(str(model_dir), "cpu")
        assert cpu.tensors
        status = client.status()
        cpu.close()
    assert held_contexts(fake_daemon) == {GPU_A: (False, 0, 0), GPU_B: (False, 0, 0)}
    assert [r.pinned for r in status.rings] == [False]
    # The worker's cuda:1 is the daemon's cuda:1 (GPU B).
    env = {"TENSORFERRY_FAKE_CUDA": f"{GPU_A},{GPU_B}"}
    with worker(fake_daemon, str(model_dir), "cuda:1", model_dir, env) as (report, _):
        assert report["tensors"] > 0
        held = held_contexts(fake_daemon)
    context_a, context_b = held[GPU_A], held[GPU_B]
    assert context_a == (False, 0, 0)
    assert context_b[0] is True
    assert context_b[1] > 0  # the arena (resident until evicted)
    assert context_b[2] == 4 * SLOT  # the ring, pinned in GPU B's context
    out = fake_daemon.output()
    assert f"CUDA opened cuda:1 ({GPU_B}): context, 2 copy streams" in out
    assert "CUDA opened cuda:0" not in out


async def test_two_loads_asking_for_one_gpu_at_once_open_it_once() -> None:
    async with runtime(opened=False) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        assert fake.contexts == set()
        gate = threading.Event()
        create = fake.stream_create

        def slow_create(ordinal: int) -> Stream:
            gate.wait(10)  # both loads are waiting by now
            return create(ordinal)

        fake.stream_create = slow_create  # type: ignore[method-assign]
        first = asyncio.create_task(cuda.open_devices([cuda.devices[1]]))
        second = asyncio.create_task(cuda.open_devices([cuda.devices[1]]))
        await asyncio.sleep(0.05)
        assert not first.done()
        assert not second.done()
        gate.set()
        await asyncio.gather(first, second)
        assert len(fake.streams(1)) == 2  # copy_streams, once
        assert fake.streams(0) == []
        assert fake.contexts == {1}
        assert cuda.ring.is_open
        assert cuda.ring.free == cuda.ring.slots


async def test_a_cancelled_first_load_leaves_the_gpu_opened_for_the_next() -> None:
    async with runtime(opened=False) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        gate = threading.Event()
        create = fake.stream_create

        def slow_create(ordinal: int) -> Stream:
            gate.wait(10)
            return create(ordinal)

        fake.stream_create = slow_create  # type: ignore[method-assign]
        first = asyncio.create_task(cuda.open_devices([cuda.devices[0]]))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        await cuda.open_devices([cuda.devices[0]])
        assert len(fake.streams(0)) == 2
        # The ring's slots were handed out by the load that came next.
        assert cuda.ring.free == cuda.ring.slots
