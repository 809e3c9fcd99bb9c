"""CUDA calls that fail say so (issue #18): a worker whose device sync fails keeps its
lease (its mapping may still be open); cudaFree and cudaEventQuery report their errors,
with cupy (stubbed: no GPU here) and with the fake.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tensorferry.client._cuda import CudaTarget, close_released, import_arena
from tensorferry.cuda import CudaError, Event, FakeDevice
from tensorferry.cuda import fake as fake_module
from tensorferry.cuda.cupy_api import CupyCudaApi
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.v1 import tensorferry_pb2 as pb
from tests.test_cuda_e2e import GPU_A

STICKY = "cudaErrorIllegalAddress: an illegal memory access was encountered"


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
            assert close_released() == 1  # the finalizer queued it; closed here, and failed
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

    def setDevice(self, ordinal: int) -> None:
        pass

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
    # The driver's thread context (cuCtxGetCurrent/SetCurrent): none here.
    stub._ctx = SimpleNamespace(current=lambda: None, set_current=lambda ctx: None)
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
