"""Lifetimes of GPU memory (issue #18): when arenas are allocated and freed, on which
thread, and that nothing frees memory a worker may still map.

- cudaMalloc and cudaFree run on the sink's thread, never the event loop (the fake is
  made slow, as a busy device makes cudaFree wait).
- Release refuses a GPU lease: only the lease's stream proves the worker's mapping gone.

Failed CUDA calls (a worker's failed sync, cudaFree, cudaEventQuery) are in
test_cuda_failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tensorferry.client import Client
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.gpu.layout import Piece
from tensorferry.errors import FailedPrecondition
from tests._cuda_fake_helpers import SLOT, all_released, load, model, runtime, until
from tests._cuda_helpers import wait_for, write_odd_model
from tests.conftest import Daemon, daemon_env, running_daemon
from tests.test_cuda_e2e import FAKE_CUDA, GPU_A, GPU_B, fake_files

#: Seconds the fake's malloc and free take while a test holds the device busy.
BUSY = 1.0


@contextlib.asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """The gaps between the ticks of a 10 ms ticker on the loop: a long one means
    something blocked the loop."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with asyncio.TaskGroup() as tg:
        tg.create_task(tick())
        await asyncio.sleep(0)  # the ticker takes its first time before the body runs
        try:
            yield gaps
        finally:
            stop.set()


# -- cudaMalloc and cudaFree off the event loop ------------------------------------------


async def test_cuda_free_runs_off_the_event_loop() -> None:
    async with runtime() as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        arena = cuda.sink.allocate(cuda.devices[0], SLOT, "test")
        fake.busy = BUSY
        async with loop_gaps() as gaps:
            cuda.sink.release(arena)
            await asyncio.sleep(BUSY / 2)
            # Queued, not done: the device is still busy with it.
            assert fake.mem_get_info(0)[0] < fake.mem_get_info(0)[1]
            await until(lambda: all_released(cuda), timeout=5 * BUSY)
        fake.busy = 0
        assert max(gaps) < BUSY / 2, gaps


async def test_a_free_after_the_last_copy_runs_off_the_event_loop() -> None:
    # The free of an arena released while copies were queued runs from the callback that
    # reports the last copy done.
    async with runtime(slots=2) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        arena = cuda.sink.allocate(cuda.devices[0], SLOT, "test")
        slot = await cuda.ring.acquire()
        lane0, _ = fake.streams(0)
        with lane0.held():
            cuda.engine.submit(slot, [Piece(0, 0, SLOT)], [arena])
            cuda.sink.release(arena)  # copies queued: freed when they are done
            assert arena.freeing
            assert arena.inflight == 1
            fake.busy = BUSY
        async with loop_gaps() as gaps:
            await until(lambda: all_released(cuda), timeout=5 * BUSY)
        fake.busy = 0
        assert max(gaps) < BUSY / 2, gaps


async def test_cuda_malloc_of_a_load_runs_off_the_event_loop(tmp_path: Path) -> None:
    async with runtime() as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        store, plan, uri = await model(tmp_path / "m")
        fake.busy = BUSY
        async with loop_gaps() as gaps:
            got = await load(cuda, store, plan, uri)
        fake.busy = 0
        for arena in got.arenas:
            cuda.sink.release(arena)
        await until(lambda: all_released(cuda))
        assert max(gaps) < BUSY / 2, gaps


async def test_a_load_cancelled_during_cuda_malloc_frees_what_it_got(tmp_path: Path) -> None:
    async with runtime() as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        store, plan, uri = await model(tmp_path / "m")
        fake.busy = BUSY

        async def run() -> None:
            await load(cuda, store, plan, uri)

        task = asyncio.create_task(run())
        await asyncio.sleep(BUSY / 4)  # inside the first cudaMalloc
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: all_released(cuda), timeout=5 * BUSY)
        fake.busy = 0


async def test_close_waits_for_the_queued_frees() -> None:
    async with runtime() as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        arena = cuda.sink.allocate(cuda.devices[0], SLOT, "test")
        fake.busy = BUSY / 4
        cuda.sink.release(arena)
    # runtime() checked every fake allocation gone: close waited for the free.


# -- Release and GPU leases ---------------------------------------------------------------


@pytest.fixture
def fake_daemon(local_root: Path) -> Iterator[Daemon]:
    before = fake_files()
    with running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=FAKE_CUDA) as d:
        yield d
    assert fake_files() - before == set()


def test_release_of_a_gpu_lease_is_refused_while_it_may_be_mapped(
    fake_daemon: Daemon, local_root: Path
) -> None:
    write_odd_model(local_root / "m", 1 << 20)
    uri = str(local_root / "m")
    api = FakeCudaApi.from_uuids([GPU_A, GPU_B])
    try:
        with Client(fake_daemon.socket, cuda=api) as client:
            model = client.load(uri, device="cuda:0")
            with pytest.raises(FailedPrecondition) as info:
                client.release(model.lease_id)
            assert "cannot be released while the worker may still map it" in info.value.message
            assert model.lease_end is None
            client.evict(uri)
            # Evicted, but the lease holds it: the worker's views still read the arena.
            assert [m.leases for m in client.list()] == [1]
            assert api.open_imports == 1
            flat = next(iter(model.tensors.values()))
            assert flat.numel() > 0
            del flat
            model.close()
            gc.collect()
            assert api.open_imports == 0  # the mapping closed, then the lease ended
            wait_for(lambda: client.list() == [])
    finally:
        api.close()
