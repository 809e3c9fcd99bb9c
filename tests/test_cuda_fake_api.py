"""The ring, the copy engine and the fake CUDA API itself, in process: slots come back
only after their copies, IPC handles open only in another process, and the fake refuses
what a GPU would not do silently (see test_cuda_fake.py for loads).
"""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from tensorferry.client._cuda import CudaTarget, import_arena
from tensorferry.cuda import CudaError, FakeDevice
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.gpu.layout import Piece
from tensorferry.errors import FailedPrecondition
from tensorferry.v1 import tensorferry_pb2 as pb
from tests import _fake_cuda_child
from tests._cuda_fake_helpers import GPU_A, GPU_B, SLOT, all_released, runtime, until


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
