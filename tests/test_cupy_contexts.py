"""The cupy API's CUDA contexts (#27 review): a load onto cuda:1 never creates a context
on cuda:0, and a call's effect is never lost to what comes after it.

cupy's ``Device.__exit__`` calls ``cudaSetDevice(previous)``; since CUDA 12 that creates
the previous device's primary context, device 0 on a thread that had none. With an engine
holding GPU 0 in EXCLUSIVE_PROCESS mode that fails after the wrapped call ran: a lost
allocation, a queued copy reported as not queued. Here ``cupy`` is a stub (imported by
``CupyCudaApi`` only in its constructor) over a model of the runtime and driver state:
per-thread current contexts, primary contexts created on first use, device 0 taken.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import threading
import types
import uuid
from typing import Any

import pytest

from tensorferry.cuda import driver
from tensorferry.cuda.cupy_api import CupyCudaApi

UUIDS = [uuid.UUID(int=0xC0 + i) for i in range(2)]
#: Context handles: the primary context of device N is BASE + N.
BASE = 0x5000


class StubRuntimeError(Exception):
    """cupy's CUDARuntimeError."""


class World:
    """What the runtime and the driver share: each thread's current context, the primary
    contexts created so far, and the GPUs an engine holds in EXCLUSIVE_PROCESS mode."""

    def __init__(self, taken: set[int]) -> None:
        self.tls = threading.local()
        self.taken = taken
        self.contexts: set[int] = set()
        self.set_devices: list[int] = []
        #: Every runtime call that needs a context, with the device it ran on.
        self.calls: list[tuple[str, int]] = []
        self.fail_restore = False
        self._ptr = 0x7F0000000000

    def current(self) -> int | None:
        return getattr(self.tls, "ctx", None)

    def primary(self, ordinal: int) -> int:
        if ordinal in self.taken:
            raise StubRuntimeError(
                f"cudaErrorDevicesUnavailable: cuda:{ordinal} is exclusive to another process"
            )
        self.contexts.add(ordinal)
        return BASE + ordinal

    def run(self, call: str) -> int:
        """A runtime call: without a current context, the runtime creates the current
        device's primary context first (device 0 unless set)."""
        ctx = self.current()
        if ctx is None:
            ctx = self.tls.ctx = self.primary(getattr(self.tls, "device", 0))
        self.calls.append((call, ctx - BASE))
        self._ptr += 0x10000
        return self._ptr


class Runtime:
    CUDARuntimeError = StubRuntimeError
    memcpyHostToDevice = 1

    def __init__(self, world: World) -> None:
        self.w = world

    def getDeviceCount(self) -> int:
        return 2

    def deviceGetPCIBusId(self, i: int) -> str:
        return f"0000:0{i + 1}:00.0"

    def getDeviceProperties(self, i: int) -> dict[str, Any]:
        return {"uuid": UUIDS[i].bytes}

    def getDevice(self) -> int:
        ctx = self.w.current()
        return ctx - BASE if ctx is not None else getattr(self.w.tls, "device", 0)

    def setDevice(self, ordinal: int) -> None:
        self.w.set_devices.append(ordinal)
        self.w.tls.ctx = self.w.primary(ordinal)  # CUDA 12: the primary context, at once
        self.w.tls.device = ordinal

    def __getattr__(self, name: str) -> Any:
        # Every other call needs a context; handles and pointers are distinct numbers.
        if name in ("memGetInfo",):
            return lambda *a: (self.w.run(name), 1 << 30)
        if name == "eventQuery":
            return lambda *a: self.w.run(name) and 0
        if name == "ipcGetMemHandle":
            return lambda *a: self.w.run(name).to_bytes(64, "little")
        return lambda *a: self.w.run(name)


def stub_cupy(world: World) -> types.ModuleType:
    rt = Runtime(world)

    class Device:  # cupy's: __exit__ sets the device it found back, unconditionally
        def __init__(self, ordinal: int) -> None:
            self.id = ordinal

        def __enter__(self) -> Device:
            self.prev = rt.getDevice()
            if self.prev != self.id:
                rt.setDevice(self.id)
            return self

        def __exit__(self, *exc: object) -> None:
            rt.setDevice(self.prev)

        def synchronize(self) -> None:
            with self:
                rt.deviceSynchronize()

    class Stream:
        def __init__(self, non_blocking: bool = False) -> None:
            self.ptr = rt.streamCreateWithFlags(1)

        def synchronize(self) -> None:
            rt.streamSynchronize(self.ptr)

    class Event:
        def __init__(self, block: bool = False, disable_timing: bool = False) -> None:
            self.ptr = rt.eventCreateWithFlags(3)

        def record(self, stream: Stream) -> None:
            rt.eventRecord(self.ptr, stream.ptr)

        def synchronize(self) -> None:
            rt.eventSynchronize(self.ptr)

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=rt, Device=Device, Stream=Stream, Event=Event,
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError),
    )  # fmt: skip
    return module


class Libcuda:
    """cuInit, cuCtxGetCurrent and cuCtxSetCurrent as ctypes calls them."""

    def __init__(self, world: World) -> None:
        self.w = world

    def cuInit(self, flags: int) -> int:
        return 0

    def cuCtxGetCurrent(self, out: Any) -> int:
        out._obj.value = self.w.current()
        return 0

    def cuCtxSetCurrent(self, ctx: ctypes.c_void_p) -> int:
        if self.w.fail_restore:
            return 201  # CUDA_ERROR_INVALID_CONTEXT
        self.w.tls.ctx = ctx.value
        return 0


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    # GPU 0 is an engine's, in EXCLUSIVE_PROCESS mode: no context of ours can open there.
    w = World(taken={0})
    monkeypatch.setitem(sys.modules, "cupy", stub_cupy(w))
    monkeypatch.setattr(driver, "libcuda", lambda: Libcuda(w))
    return w


def in_fresh_thread(fn: Any) -> Any:
    """``fn()`` on a new thread (none of its own contexts, as the loop's executor)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test's thread
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_every_call_for_cuda_1_runs_on_cuda_1_and_leaves_the_thread_as_it_was(
    world: World,
) -> None:
    api = CupyCudaApi()

    def calls() -> int | None:
        api.host_register(0x1000, 4096, 1)
        memory = api.malloc(1, 1 << 20)
        stream, event = api.stream_create(1), api.event_create(1)
        api.memcpy_h2d_async(memory.ptr, 0x1000, 4096, stream)
        api.event_record(event, stream)
        assert api.event_query(event) is True
        api.event_synchronize(event)
        api.stream_synchronize(stream)
        api.mem_get_info(1)
        api.device_synchronize(1)
        api.event_destroy(event)
        api.stream_destroy(stream)
        api.free(memory)
        api.host_unregister(0x1000, 1)
        return world.current()

    assert in_fresh_thread(calls) is None  # a thread without a context keeps none
    assert 0 not in world.set_devices
    assert world.contexts == {1}
    assert {device for _, device in world.calls} == {1}
    # A thread that holds a context (an engine's, on cuda:1) gets it back.
    world.taken = set()

    def engine_thread() -> int | None:
        Runtime(world).setDevice(1)
        api.mem_get_info(0)
        return world.current()

    assert in_fresh_thread(engine_thread) == BASE + 1


def test_a_failure_after_the_call_loses_no_allocation_and_no_queued_copy(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    api = CupyCudaApi()
    world.fail_restore = True
    with caplog.at_level(logging.ERROR, "tensorferry.cuda.cupy_api"):
        memory = in_fresh_thread(lambda: api.malloc(1, 1 << 20))
        stream = in_fresh_thread(lambda: api.stream_create(1))
        in_fresh_thread(lambda: api.memcpy_h2d_async(memory.ptr, 0x1000, 4096, stream))
    assert ("memcpyAsync", 1) in world.calls  # queued, and said so (no exception)
    assert (
        "restoring the thread's CUDA context after a call on cuda:1 failed: cuCtxSetCurrent "
        "failed with status 201"
    ) in caplog.text
    world.fail_restore = False
    in_fresh_thread(lambda: api.free(memory))  # the allocation is known: freed
    assert ("free", 1) in world.calls
    assert world.contexts == {1}


def test_the_daemons_copy_path_onto_cuda_1_never_opens_cuda_0(world: World) -> None:
    from tensorferry.daemon.gpu.h2d import CopyEngine
    from tensorferry.daemon.gpu.layout import Piece
    from tensorferry.daemon.gpu.ring import PinnedRing
    from tensorferry.daemon.sinks.cuda import CudaSink

    api = CupyCudaApi()
    device = api.devices()[1]

    async def load() -> None:
        ring = PinnedRing(api, 2, 4096).open(ordinal=1)
        engine = CopyEngine(api, [device], [ring], 2).start()
        sink = CudaSink(api, reserve=0, instance="contexts")
        try:
            arena = await sink.place(device, 8192, "test")
            for i in range(4):
                slot = await ring.acquire()
                engine.submit(slot, [Piece(0, i % 2 * 4096, 4096)], [arena])
            await engine.settle([arena])
            sink.release(arena)
        finally:
            engine.close()
            await asyncio.sleep(0)
            sink.close()
            ring.close()

    asyncio.run(load())
    assert 0 not in world.set_devices
    assert world.contexts == {1}
    calls = {call for call, _ in world.calls}
    assert {"eventSynchronize", "streamSynchronize", "hostUnregister", "free", "streamDestroy",
            "eventDestroy"} <= calls  # fmt: skip
    assert {device for _, device in world.calls} == {1}
