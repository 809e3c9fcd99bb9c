"""A GPU whose opening fails (#27 review) on the fake CUDA API: the next load tries again
whatever happened to the loads that waited (cancelled, or an error that is no CudaError),
the error is typed and names the device, and what the failed try made is destroyed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tensorferry.cuda import CudaError, Event, Stream
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.errors import InternalError
from tests._cuda_fake_helpers import GPU_A, runtime

TAKEN = "cudaErrorDevicesUnavailable: all CUDA-capable devices are busy or unavailable"


async def test_a_failed_opening_whose_waiters_were_all_cancelled_is_not_kept() -> None:
    async with runtime(opened=False) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        gate = threading.Event()
        create = fake.stream_create
        tries: list[int] = []
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def first_fails(ordinal: int) -> Stream:
            tries.append(ordinal)
            loop.call_soon_threadsafe(started.set)
            gate.wait(10)
            if len(tries) == 1:
                raise CudaError(TAKEN)
            return create(ordinal)

        fake.stream_create = first_fails  # type: ignore[method-assign]
        load = asyncio.create_task(cuda.open_devices([cuda.devices[0]]))
        await started.wait()
        opening = cuda._opening[0]
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        gate.set()
        await asyncio.wait([opening])  # failed, with nobody left to hear it
        await asyncio.sleep(0)  # its done callbacks
        assert cuda._opening == {}
        # The next load opens the GPU instead of getting the old error.
        await cuda.open_devices([cuda.devices[0]])
        assert len(fake.streams(0)) == 2


async def test_an_unexpected_error_is_typed_names_the_gpu_and_does_not_stick() -> None:
    async with runtime(opened=False) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        create = fake.stream_create
        tries: list[int] = []

        def first_fails(ordinal: int) -> Stream:
            tries.append(ordinal)
            if len(tries) == 1:
                raise ValueError("a driver binding's own error")
            return create(ordinal)

        fake.stream_create = first_fails  # type: ignore[method-assign]
        with pytest.raises(InternalError) as info:
            await cuda.open_devices([cuda.devices[0]])
        assert info.value.message == (
            f"CUDA failed to open cuda:0 ({GPU_A}): ValueError: a driver binding's own error"
        )
        await cuda.open_devices([cuda.devices[0]])
        assert cuda.engine.opened(0)


async def test_a_failed_opening_destroys_the_streams_and_events_it_made() -> None:
    async with runtime(opened=False) as cuda:
        fake = cuda.api
        assert isinstance(fake, FakeCudaApi)
        create = fake.event_create
        made: list[int] = []

        def third_fails(ordinal: int) -> Event:
            made.append(ordinal)
            if len(made) == 3:
                raise CudaError("cudaErrorMemoryAllocation: out of memory")
            return create(ordinal)

        fake.event_create = third_fails  # type: ignore[method-assign]
        with pytest.raises(InternalError) as info:
            await cuda.open_devices([cuda.devices[0]])
        assert info.value.message == (
            f"CUDA failed to open cuda:0 ({GPU_A}): cudaErrorMemoryAllocation: out of memory"
        )
        assert fake.streams(0) == []
        assert fake.events == 0
        await cuda.open_devices([cuda.devices[0]])
        assert len(fake.streams(0)) == 2  # copy_streams, not 4
        assert fake.events == cuda.rings.rings[0].slots
