"""Lifetimes of GPU memory (issue #18): when arenas are allocated and freed, on which
thread, and that nothing frees memory a worker may still map.

- cudaMalloc and cudaFree run on the sink's thread, never the event loop (the fake is
  made slow, as a busy device makes cudaFree wait).
- Release refuses a GPU lease: only the lease's stream proves the worker's mapping gone.
- A worker whose device sync fails keeps its lease (its mapping may still be open).
- CUDA calls that fail say so: cudaFree and cudaEventQuery, with cupy (stubbed: no GPU
  here) and with the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tensorferry.client import Client
from tensorferry.client._cuda import CudaTarget, import_arena
from tensorferry.cuda import CudaError, Event, FakeDevice
from tensorferry.cuda import fake as fake_module
from tensorferry.cuda.cupy_api import CupyCudaApi
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.gpu.layout import Piece
from tensorferry.errors import FailedPrecondition
from tensorferry.v1 import tensorferry_pb2 as pb
from tests._cuda_helpers import wait_for, write_odd_model
from tests.conftest import Daemon, daemon_env, running_daemon
from tests.test_cuda_e2e import FAKE_CUDA, GPU_A, GPU_B, fake_files
from tests.test_cuda_fake import SLOT, all_released, load, model, runtime, until

#: Seconds the fake's malloc and free take while a test holds the device busy.
BUSY = 1.0
STICKY = "cudaErrorIllegalAddress: an illegal memory access was encountered"


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


# -- a worker's failed device sync ---------------------------------------------------------


def test_a_failed_sync_keeps_the_lease_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = FakeCudaApi([FakeDevice(GPU_A, 1 << 20)], shm_dir=tmp_path)
    memory = exporter.malloc(0, 4096)
    handle = exporter.ipc_get_handle(memory)
    # The worker: another fake CUDA context (the fake refuses handles of its own).
    monkeypatch.setattr(fake_module, "_CONTEXT", b"workerxx")
    worker = FakeCudaApi([FakeDevice(GPU_A, 1 << 20)], shm_dir=tmp_path)
    info = worker.devices()[0]
    target = CudaTarget("cuda:0", worker, (0,), (info.uuid,))
    grant = pb.CudaIpcGrant(
        handle=handle, size=4096, gpu_uuid=info.uuid, pci_bus_id=info.pci_bus_id
    )
    ended: list[bool] = []
    try:
        flat = import_arena(grant, target, lambda: ended.append(True))
        worker.sticky = STICKY
        with caplog.at_level(logging.ERROR, "tensorferry.client._cuda"):
            del flat
            gc.collect()
        assert ended == []  # the daemon must not free what may still be mapped here
        assert worker.open_imports == 1
        assert "keeps its lease" in caplog.text
        assert STICKY in caplog.text
    finally:
        worker.sticky = None
        worker.close()
        exporter.free(memory)
        exporter.close()


# -- CUDA calls that report their failures -------------------------------------------------


class _RuntimeError(Exception):
    """Stands in for cupy's CUDARuntimeError."""

    def __init__(self, status: int) -> None:
        super().__init__(f"cudaErrorIllegalAddress: status {status}")
        self.status = status


class _Runtime:
    """The part of ``cupy.cuda.runtime`` CupyCudaApi uses here, with cupy's contract:
    free and eventQuery raise CUDARuntimeError on failure; eventQuery returns 600 for
    cudaErrorNotReady."""

    CUDARuntimeError = _RuntimeError

    def __init__(self) -> None:
        self.fail: int | None = None  # the status the next calls fail with
        self.freed: list[int] = []
        self.query = 0

    def malloc(self, nbytes: int) -> int:
        return 0x7F0000000000

    def free(self, ptr: int) -> None:
        if self.fail is not None:
            raise _RuntimeError(self.fail)
        self.freed.append(ptr)

    def eventQuery(self, event: int) -> int:
        if self.fail is not None:
            raise _RuntimeError(self.fail)
        return self.query


class _Memory:
    """cupy.cuda.Memory: cudaMalloc, and cudaFree in a destructor that cannot raise."""

    def __init__(self, rt: _Runtime, nbytes: int) -> None:
        self.rt, self.ptr = rt, rt.malloc(nbytes)

    def __del__(self) -> None:
        with contextlib.suppress(_RuntimeError):
            self.rt.free(self.ptr)


def stub_cupy() -> tuple[CupyCudaApi, _Runtime]:
    rt = _Runtime()
    cuda_ns = SimpleNamespace(
        runtime=rt, Device=lambda ordinal: contextlib.nullcontext(),
        Memory=lambda nbytes: _Memory(rt, nbytes),
    )  # fmt: skip
    api = object.__new__(CupyCudaApi)
    stub: Any = api  # built without __init__, which needs a GPU
    stub._cp = SimpleNamespace(cuda=cuda_ns)
    stub._rt = rt
    stub._errors = (_RuntimeError,)
    stub._allocs = {}
    return api, rt


def test_cupy_free_reports_a_failed_cudafree() -> None:
    api, rt = stub_cupy()
    memory = api.malloc(0, 1 << 20)
    rt.fail = 700
    with pytest.raises(CudaError, match="cudaErrorIllegalAddress"):
        api.free(memory)
    rt.fail = None
    api.free(memory)  # still known after the failure: not forgotten as if freed
    assert rt.freed == [memory.ptr]


def test_cupy_event_query_raises_errors_other_than_not_ready() -> None:
    api, rt = stub_cupy()
    # cupy's Event.done reads every error as "not done".
    event = Event(0, SimpleNamespace(ptr=0x1234, done=False))
    assert api.event_query(event) is True
    rt.query = 600  # cudaErrorNotReady
    assert api.event_query(event) is False
    rt.fail = 700
    with pytest.raises(CudaError, match="cudaErrorIllegalAddress"):
        api.event_query(event)


def test_the_fake_reports_sticky_errors_as_cuda_does() -> None:
    fake = FakeCudaApi([FakeDevice(GPU_A, 1 << 20)])
    try:
        memory = fake.malloc(0, 4096)
        event = fake.event_create(0)
        assert fake.event_query(event) is True
        fake.sticky = STICKY
        with pytest.raises(CudaError, match="cudaErrorIllegalAddress"):
            fake.event_query(event)
        with pytest.raises(CudaError, match="cudaErrorIllegalAddress"):
            fake.free(memory)
        with pytest.raises(CudaError, match="cudaErrorIllegalAddress"):
            fake.device_synchronize(0)
        fake.sticky = None
        fake.free(memory)
    finally:
        fake.close()
