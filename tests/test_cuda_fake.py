"""The CUDA path in process, on the fake CUDA API: ring, copy engine, GPU arenas, loads.

The fake copies really move bytes, on stream threads, after the call returned; with
jitter they complete out of order across streams. A slot recycled too early, or an arena
freed under a queued copy, shows up as wrong bytes or as the fake's own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.client._cuda import CudaTarget, import_arena
from tensorferry.cuda import CudaError, FakeDevice
from tensorferry.cuda import fake as fake_module
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.gpu.layout import Piece
from tensorferry.daemon.gpu.load import GpuLoaded, load_plan_cuda
from tensorferry.daemon.gpu.ring import Slot
from tensorferry.daemon.gpu.runtime import CudaRuntime, open_cuda
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.daemon.planner import Plan, make_plan
from tensorferry.daemon.source import list_source, parse_uri, read_source
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.daemon.store.local import LocalStore
from tensorferry.errors import FailedPrecondition, InternalError, ResourceExhausted, SourceNotFound
from tensorferry.v1 import tensorferry_pb2 as pb
from tests import _fake_cuda_child
from tests._cuda_helpers import write_odd_model

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
SLOT = 64 << 10
MEMORY = 64 << 20


@contextlib.asynccontextmanager
async def runtime(
    *, slots: int = 4, jitter: float = 0.0, memory: tuple[int, int] = (MEMORY, MEMORY)
) -> AsyncIterator[CudaRuntime]:
    settings = CudaSettings(
        api="fake", ring_slots=slots, slot_size=SLOT, copy_streams=2, reserve=0,
        fake_devices=(FakeDevice(GPU_A, memory[0]), FakeDevice(GPU_B, memory[1])),
        fake_jitter=jitter,
    )  # fmt: skip
    async with open_cuda(settings, chunk_size=SLOT, instance="test") as cuda:
        assert cuda is not None
        yield cuda
    # Every fake allocation of this process is gone.
    assert not list(Path("/dev/shm").glob(f"{fake_module.PREFIX}{fake_module._CONTEXT.hex()}.*"))


class CountingStore(LocalStore):
    """A local directory that counts range reads and can fail the Nth."""

    def __init__(self, root: Path, uri: str, fail_at: int = 0) -> None:
        super().__init__(root, uri)
        self.reads = 0
        self.fail_at = fail_at

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        self.reads += 1
        if self.reads == self.fail_at:
            raise SourceNotFound(f"{self.describe(obj)}: gone")
        await super().read_into(obj, start, dest)


async def model(directory: Path, fail_at: int = 0) -> tuple[CountingStore, Plan, str]:
    if not directory.exists():
        write_odd_model(directory, 2 << 20)  # tensors not 256-byte aligned in the file
    ref = parse_uri(str(directory))
    assert ref.path is not None
    store = CountingStore(ref.path, ref.uri, fail_at)
    source = await read_source(ref, store, await list_source(ref, store))
    return store, make_plan(source, SLOT), ref.uri


def expected(directory: Path) -> dict[str, bytes]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return {
        k: t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for k, t in tensors.items()
    }


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    # Polled: the states checked change on stream threads, which signal no asyncio event.
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def load(
    cuda: CudaRuntime, store: CountingStore, plan: Plan, uri: str, n: int = 2
) -> Awaitable[GpuLoaded]:
    return load_plan_cuda(
        store, plan, uri, cuda, cuda.devices[:n], concurrency=8, on_plan=lambda p: None,
        progress=lambda n: None,
    )  # fmt: skip


def all_released(cuda: CudaRuntime) -> bool:
    api = cuda.api
    full = all(
        api.mem_get_info(d.ordinal)[0] == api.mem_get_info(d.ordinal)[1] for d in cuda.devices
    )
    return cuda.ring.free == cuda.ring.slots and cuda.sink.arena_names == [] and full


async def test_a_slot_returns_to_the_ring_only_after_its_copy_event() -> None:
    async with runtime(slots=4) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        arena = cuda.sink.allocate(cuda.devices[0], 4 * SLOT, "test")
        slots = [await cuda.ring.acquire() for _ in range(4)]
        for s in slots:
            s.view[:] = bytes([s.index + 1]) * SLOT
        lane0, _ = fake.streams(0)
        with lane0.held():
            for i, s in enumerate(slots):  # lanes alternate: slots 0 and 2 go to lane 0
                cuda.engine.submit(s, [Piece(0, i * SLOT, SLOT)], [arena])
            await until(lambda: cuda.ring.free == 2)
            # Completed out of order: 1 and 3 are back, 0 and 2 wait for their events.
            back = [await cuda.ring.acquire(), await cuda.ring.acquire()]
            assert sorted(s.index for s in back) == [1, 3]
            assert fake.pending_reads(slots[0].ptr, SLOT) == 1
            assert slots[0].pending == 1
            assert not arena.idle.is_set()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await cuda.ring.acquire()
            for s in back:
                cuda.ring.release(s)
        await until(lambda: cuda.ring.free == 4)
        await cuda.engine.settle([arena])
        assert fake.read(arena.ptr, 4 * SLOT) == b"".join(bytes([i + 1]) * SLOT for i in range(4))
        cuda.sink.release(arena)
        await until(lambda: all_released(cuda))  # the frees run on the sink's thread


async def test_one_fetch_fills_two_gpus_with_out_of_order_copies(tmp_path: Path) -> None:
    store, plan, uri = await model(tmp_path / "m")
    async with runtime(slots=3, jitter=0.003) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        handed: list[Slot] = []
        acquire = cuda.ring.acquire

        async def checked_acquire() -> Slot:
            slot = await acquire()
            # Nothing queued may still read a slot that a fetcher is about to overwrite.
            assert fake.pending_reads(slot.ptr, SLOT) == 0
            handed.append(slot)
            return slot

        cuda.ring.acquire = checked_acquire  # type: ignore[method-assign]
        got = await load(cuda, store, plan, uri)
        assert store.reads == len(got.plan.ranges) > 3 * cuda.ring.slots  # once, not per GPU
        assert len(handed) == store.reads  # every slot recycled several times
        want = expected(tmp_path / "m")
        for arena in got.arenas:
            for t in got.plan.tensors:
                assert t.offset % 256 == 0, t
                assert fake.read(arena.ptr + t.offset, t.nbytes) == want[t.name], t.name
        assert {a.device.uuid for a in got.arenas} == {GPU_A, GPU_B}
        for arena in got.arenas:
            cuda.sink.release(arena)
        await until(lambda: all_released(cuda))  # the frees run on the sink's thread


async def test_opening_a_handle_in_the_exporting_process_fails() -> None:
    async with runtime() as cuda:
        fake = cuda.api
        arena = cuda.sink.allocate(cuda.devices[1], SLOT, "test")
        with pytest.raises(CudaError) as info:
            fake.ipc_open(arena.handle, 1)
        assert str(info.value) == "cudaErrorDeviceUninitialized: invalid device context"
        grant = pb.CudaIpcGrant(handle=arena.handle, size=arena.size, gpu_uuid=GPU_B)
        target = CudaTarget("cuda:1", fake, (1,), (GPU_B,))
        ended: list[bool] = []
        with pytest.raises(FailedPrecondition) as failed:
            import_arena(grant, target, lambda: ended.append(True))
        assert failed.value.message == (
            f"opening the arena on {GPU_B} failed: cudaErrorDeviceUninitialized: invalid "
            "device context"
        )
        assert ended == []  # the caller ends the lease of a failed import
        # Another process opens it and sees the bytes.
        slot = await cuda.ring.acquire()
        slot.view[:] = b"\x5a" * SLOT
        cuda.engine.submit(slot, [Piece(0, 0, SLOT)], [arena])
        await cuda.engine.settle([arena])
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as pool:
            opened = pool.apply(_fake_cuda_child.read_arena, ([GPU_A, GPU_B], arena.handle, 1))
        assert opened == b"\x5a" * SLOT
        cuda.sink.release(arena)
        await until(lambda: all_released(cuda))  # the frees run on the sink's thread


async def test_a_failed_fetch_releases_slots_and_arenas(tmp_path: Path) -> None:
    store, plan, uri = await model(tmp_path / "m", fail_at=9)
    async with runtime(slots=3, jitter=0.002) as cuda:
        with pytest.raises(SourceNotFound):
            await load(cuda, store, plan, uri)
        await until(lambda: all_released(cuda))


async def test_a_cuda_copy_error_fails_the_load_and_releases_everything(tmp_path: Path) -> None:
    store, plan, uri = await model(tmp_path / "m")
    async with runtime(slots=3) as cuda:
        assert isinstance(cuda.api, FakeCudaApi)
        cuda.api.fail_copy_at = 5
        with pytest.raises(InternalError) as info:
            await load(cuda, store, plan, uri)
        assert info.value.message == (
            f"CUDA failed while placing {uri}: cudaErrorLaunchFailure: unspecified launch failure"
        )
        await until(lambda: all_released(cuda))


async def test_cancelled_load_frees_its_arena_only_after_queued_copies(tmp_path: Path) -> None:
    store, plan, uri = await model(tmp_path / "m")
    async with runtime(slots=4) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        with contextlib.ExitStack() as held:
            for lane in fake.streams(0):
                held.enter_context(lane.held())
            submitted: list[object] = []
            submit = cuda.engine.submit

            def counting_submit(*args: Any) -> None:
                submit(*args)
                submitted.append(args)

            cuda.engine.submit = counting_submit  # type: ignore[method-assign]
            task = asyncio.create_task(load(cuda, store, plan, uri, n=1))
            # Every slot's copy is queued behind the held streams (a slot whose read is
            # still running would go back to the ring on cancel).
            await until(lambda: len(submitted) == 4)
            assert cuda.ring.free == 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Released, but copies into it are queued: the free waits for them.
            assert len(cuda.sink.arena_names) == 1
            assert fake.mem_get_info(0)[0] < MEMORY
            assert cuda.ring.free == 0
        await until(lambda: all_released(cuda))


async def test_second_gpu_without_room_fails_and_frees_the_first(tmp_path: Path) -> None:
    store, plan, uri = await model(tmp_path / "m")
    async with runtime(memory=(MEMORY, 1 << 20)) as cuda:
        reclaimed: list[tuple[int, str]] = []
        cuda.sink.reclaim = lambda needed, gpu: reclaimed.append((needed, gpu))
        with pytest.raises(ResourceExhausted) as info:
            await load(cuda, store, plan, uri)
        size = 4 << 20  # the GPU layout, rounded to 2 MiB
        assert info.value.message == (
            f"loading {uri} onto {GPU_B} needs {size} bytes of GPU memory but only {1 << 20} "
            "are free beyond the reserve (0 bytes, [cuda] reserve); evict a model with "
            "`tensorferry evict` or free memory on that GPU"
        )
        assert reclaimed == [(size - (1 << 20), GPU_B)]  # asked the registry first
        assert store.reads == 0
        await until(lambda: all_released(cuda))


def test_fake_refuses_what_a_gpu_would_not_do_silently() -> None:
    fake = FakeCudaApi([FakeDevice(GPU_A, 1 << 20)])
    try:
        mem = fake.malloc(0, 4096)
        stream = fake.stream_create(0)
        host = bytearray(4096)
        import ctypes

        ptr = ctypes.addressof((ctypes.c_char * 4096).from_buffer(host))
        with pytest.raises(CudaError, match="unregistered \\(pageable\\) host memory"):
            fake.memcpy_h2d_async(mem.ptr, ptr, 4096, stream)
        fake.host_register(ptr, 4096)
        with pytest.raises(CudaError, match="cudaErrorHostMemoryAlreadyRegistered"):
            fake.host_register(ptr, 16)
        with fake.streams(0)[0].held():
            fake.memcpy_h2d_async(mem.ptr, ptr, 4096, stream)
            event = fake.event_create(0)
            fake.event_record(event, stream)
            assert not fake.event_query(event)
            with pytest.raises(CudaError, match="queued copies still write"):
                fake.free(mem)
            with pytest.raises(CudaError, match="queued copies still read"):
                fake.host_unregister(ptr)
        fake.event_synchronize(event)
        assert fake.event_query(event)
        with pytest.raises(CudaError, match="cudaErrorMemoryAllocation"):
            fake.malloc(0, 1 << 20)
        fake.free(mem)
        fake.host_unregister(ptr)
    finally:
        fake.close()
