"""The fake CUDA runtime, a counting store and a model to load, for the in-process CUDA
tests (test_cuda_fake*, test_cuda_lifetimes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from tensorferry.cuda import FakeDevice
from tensorferry.cuda import fake as fake_module
from tensorferry.daemon.gpu.load import GpuLoaded, load_plan_cuda
from tensorferry.daemon.gpu.runtime import CudaRuntime, open_cuda
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.daemon.planner import Plan, make_plan
from tensorferry.daemon.source import list_source, parse_uri, read_source
from tensorferry.daemon.store.base import ObjectInfo
from tensorferry.daemon.store.local import LocalStore
from tensorferry.errors import SourceNotFound
from tests._cuda_helpers import write_odd_model

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
SLOT = 64 << 10
MEMORY = 64 << 20


@contextlib.asynccontextmanager
async def runtime(
    *, slots: int = 4, jitter: float = 0.0, memory: tuple[int, int] = (MEMORY, MEMORY),
    opened: bool = True,
) -> AsyncIterator[CudaRuntime]:  # fmt: skip
    settings = CudaSettings(
        api="fake", ring_slots=slots, slot_size=SLOT, copy_streams=2, reserve=0,
        fake_devices=(FakeDevice(GPU_A, memory[0]), FakeDevice(GPU_B, memory[1])),
        fake_jitter=jitter,
    )  # fmt: skip
    async with open_cuda(settings, chunk_size=SLOT, instance="test") as cuda:
        assert cuda is not None
        if opened:  # as after a first load onto each: tests use the ring and engine directly
            await cuda.open_devices(cuda.devices)
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
