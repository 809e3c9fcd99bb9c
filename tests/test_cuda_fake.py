"""Loads through the CUDA path in process, on the fake CUDA API: one fetch into GPU
arenas, and failures and cancellation that release every slot and arena.

The fake copies really move bytes, on stream threads, after the call returned; with
jitter they complete out of order across streams. A slot recycled too early, or an arena
freed under a queued copy, shows up as wrong bytes or as the fake's own error.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.daemon.gpu.ring import Slot
from tensorferry.errors import InternalError, ResourceExhausted, SourceNotFound
from tests._cuda_fake_helpers import (
    GPU_A,
    GPU_B,
    MEMORY,
    SLOT,
    all_released,
    expected,
    load,
    model,
    runtime,
    until,
)


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
        await cuda.open_devices(cuda.devices[:1])  # its streams exist from the first load on
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
