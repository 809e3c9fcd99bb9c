"""The worker's queue of GPU mappings waiting for their close (#27 review), on the fake API:
a lease end queued by a finalizer that runs while the queue is being edited is never lost,
a load of an arena whose mapping waits for its close takes the mapping up again, and the
public ``close_released_gpu_mappings`` (also run by ``Client.close()``) closes them."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorferry.client import _cuda, close_released_gpu_mappings
from tensorferry.client._cuda import CudaTarget, import_arena
from tensorferry.cuda import FakeDevice
from tensorferry.cuda import fake as fake_module
from tensorferry.cuda.fake import FakeCudaApi
from tensorferry.v1 import tensorferry_pb2 as pb
from tests.test_cuda_e2e import GPU_A


class Arenas:
    """Two arenas exported by one fake process and imported by another (this worker)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.exporter = FakeCudaApi([FakeDevice(GPU_A, 1 << 20)], shm_dir=tmp_path)
        self.memory = [self.exporter.malloc(0, 4096) for _ in range(2)]
        handles = [self.exporter.ipc_get_handle(m) for m in self.memory]
        monkeypatch.setattr(fake_module, "_CONTEXT", b"workerxx")  # another process
        self.worker = FakeCudaApi([FakeDevice(GPU_A, 1 << 20)], shm_dir=tmp_path)
        info = self.worker.devices()[0]
        self.target = CudaTarget("cuda:0", self.worker, (0,), (info.uuid,))
        self.grants = [
            pb.CudaIpcGrant(handle=h, size=4096, gpu_uuid=info.uuid, pci_bus_id=info.pci_bus_id)
            for h in handles
        ]
        self.ended: list[int] = []

    def load(self, i: int) -> torch.Tensor:
        return import_arena(self.grants[i], self.target, lambda: self.ended.append(i))

    def close(self) -> None:
        close_released_gpu_mappings()
        self.worker.close()
        for m in self.memory:
            self.exporter.free(m)
        self.exporter.close()


@pytest.fixture
def arenas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Arenas]:
    a = Arenas(tmp_path, monkeypatch)
    yield a
    gc.collect()
    a.close()
    assert _cuda._open == {}  # nothing left for the next test (keys hold id(api))


class CollectedMidEdit(list[Any]):
    """The queue, where a collection runs at the first edit and finalizes a view (as the
    garbage collector may, on any allocation): its ``_last_view`` appends meanwhile."""

    def __init__(self, items: list[Any], collect: Callable[[], None]) -> None:
        super().__init__(items)
        self.collect: Callable[[], None] | None = collect

    def _first(self) -> None:
        if self.collect is not None:
            collect, self.collect = self.collect, None
            collect()

    def __setitem__(self, key: Any, value: Any) -> None:
        self._first()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._first()
        super().__delitem__(key)

    def clear(self) -> None:
        self._first()
        super().clear()


def test_a_lease_end_queued_while_a_load_takes_its_mapping_up_is_kept(
    arenas: Arenas, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = [arenas.load(0), arenas.load(1)]
    del views[0]
    gc.collect()  # arena 0's mapping waits for its close
    monkeypatch.setattr(_cuda, "_released", CollectedMidEdit(_cuda._released, views.clear))
    again = arenas.load(0)  # takes arena 0's mapping up; arena 1's last view goes meanwhile
    # Arena 0's first lease ended (the reload's covers it); arena 1's mapping was closed
    # by the load's own close_released, and its lease ended.
    assert arenas.ended == [0, 1]
    assert list(_cuda._released) == []
    assert arenas.worker.open_imports == 1
    del again


def test_a_lease_end_queued_while_the_queue_is_closed_is_kept(
    arenas: Arenas, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = [arenas.load(0), arenas.load(1)]
    del views[0]
    gc.collect()
    monkeypatch.setattr(_cuda, "_released", CollectedMidEdit(_cuda._released, views.clear))
    closed = close_released_gpu_mappings()
    closed += close_released_gpu_mappings()
    assert closed == 2
    assert sorted(arenas.ended) == [0, 1]
    assert arenas.worker.open_imports == 0


def test_a_load_takes_up_a_mapping_that_waits_for_its_close(arenas: Arenas) -> None:
    flat = arenas.load(0)
    ptr = flat.data_ptr()
    del flat
    gc.collect()
    assert arenas.ended == []  # queued: no close in a finalizer
    flat = arenas.load(0)
    assert flat.data_ptr() == ptr
    assert arenas.worker.synchronized == []  # not closed and reopened
    assert arenas.ended == [0]  # the first lease ended: the second covers the arena
    assert arenas.worker.open_imports == 1
    del flat
    gc.collect()
    assert close_released_gpu_mappings() == 1
    assert arenas.worker.synchronized == [0]
    assert arenas.ended == [0, 0]
