"""A fresh arena reserved alongside the fetch (issue #26), in process: a cold load of a
local model whose reservation is held at a region (an evict mid-reservation) or refused
by the host at one (ENOSPC, which a real tmpfs gives only when the host is out of memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tensorferry.daemon.config.settings import S3Settings, Settings
from tensorferry.daemon.loader import Loader
from tensorferry.daemon.model import Model
from tensorferry.daemon.records import RecentLoads
from tensorferry.daemon.registry import Registry
from tensorferry.daemon.sinks import populate
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.daemon.source import parse_uri
from tensorferry.devtools.modelgen import write_model
from tensorferry.errors import InternalError, ModelEvicted, ResourceExhausted
from tests.conftest import as_bytes

MODEL = 6 << 20
REGION = 1 << 20


class Held:
    """``populate._fallocate`` that lets ``free`` regions through, then holds each call
    until released; counts the calls that are running."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0
        self.running = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, fd: int, offset: int, length: int) -> None:
        with self._lock:
            self.calls += 1
            self.running += 1
            held = self.calls > self.free
        try:
            if held:
                self.entered.set()
                assert self.release.wait(30), "never released"
            os.posix_fallocate(fd, offset, length)
        finally:
            with self._lock:
                self.running -= 1


def _open_fds() -> set[str]:
    """What this process has open; an arena's mmap holds a descriptor of its own, and a
    failed load's traceback may keep it alive until the collector runs."""
    gc.collect()
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            fds.add(os.readlink(f"/proc/self/fd/{fd}"))
    return fds


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    # tmpfs, as /dev/shm is: a regular file system would not show what tmpfs does.
    path = Path(tempfile.mkdtemp(prefix="tf-fresh-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _start(
    tmp_path: Path, sink: CpuShmSink, tasks: asyncio.TaskGroup
) -> tuple[Registry, Model, str, RecentLoads]:
    root = tmp_path / "models"
    write_model(root / "m", MODEL, layer_bytes=1 << 20, seed=7)
    settings = Settings(allow=(str(root),), s3=S3Settings(chunk_size=REGION // 2))
    recent = RecentLoads()
    loader = Loader(settings, sink, None, None, None, recent)
    registry = Registry(sink, tasks, loader)
    ref = parse_uri(str(root / "m"))
    target = await loader.target(ref, ["cpu"], (), 0, 0, time.monotonic())
    model, existed = registry.get_or_start(target.key, ref.uri, target, "worker")
    assert not existed
    return registry, model, ref.uri, recent


def _arena_size(path: Path) -> int:
    """The arena of a one-file model: its data section, rounded up to a page."""
    header_len: int = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return -(-(path.stat().st_size - 8 - header_len) // 4096) * 4096


def _segments(shm_dir: Path) -> list[str]:
    return sorted(p.name for p in shm_dir.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("threads", [1, 3])
async def test_a_fresh_load_is_byte_exact_with_ranges_waiting_for_their_regions(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(populate, "REGION", REGION)
    monkeypatch.setattr(populate, "THREADS", threads)
    held = Held(free=2)
    monkeypatch.setattr(populate, "_fallocate", held)
    async with CpuShmSink(shm_dir) as sink, asyncio.TaskGroup() as tasks:
        registry, model, _, _ = await _start(tmp_path, sink, tasks)
        assert await asyncio.to_thread(held.entered.wait, 10)
        # Ranges past the reserved regions wait for theirs: none of them lands meanwhile.
        async with asyncio.timeout(10):
            while model.bytes_done == 0:  # noqa: ASYNC110 (a counter: polled)
                await asyncio.sleep(0.01)
        # Give the ranges of the held regions every chance to land (wrongly) before looking.
        await asyncio.sleep(0.3)
        assert not model.done.done()
        assert model.bytes_done <= 2 * REGION
        held.release.set()
        async with asyncio.timeout(20):
            loaded = await model.done
        assert held.calls == -(-loaded.plan.arena_size // REGION)
        assert isinstance(loaded.arena, ShmArena)
        view = loaded.arena.view
        want = load_file(tmp_path / "models" / "m" / "model.safetensors")
        for t in loaded.plan.tensors:
            assert (
                bytes(view[t.offset : t.offset + t.nbytes])
                == as_bytes(want[t.name]).numpy().tobytes()
            )
        del view
        registry.close()
    assert _segments(shm_dir) == []


async def test_an_evict_mid_reservation_stops_it_and_leaves_no_segment_and_no_thread(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(populate, "REGION", REGION)
    monkeypatch.setattr(populate, "THREADS", 1)
    held = Held(free=2)
    monkeypatch.setattr(populate, "_fallocate", held)
    fds = _open_fds()
    async with CpuShmSink(shm_dir) as sink, asyncio.TaskGroup() as tasks:
        registry, model, uri, _ = await _start(tmp_path, sink, tasks)
        assert await asyncio.to_thread(held.entered.wait, 10)
        registry.evict(uri, by="an operator")
        # The load ends only once the region in progress is done: nothing may unmap the
        # arena while the thread still maps pages into it.
        await asyncio.sleep(0.2)
        assert not model.done.done()
        assert len(_segments(shm_dir)) == 1
        held.release.set()
        async with asyncio.timeout(20):
            with pytest.raises(ModelEvicted):
                await model.done
        assert held.calls == 3  # the held region, then no other
        assert held.running == 0
        assert _segments(shm_dir) == []
        assert registry.models == []
        registry.close()
        del model  # its failure's traceback holds a view of the arena, as a client's would
    assert _open_fds() == fds


async def test_a_region_the_host_cannot_allocate_fails_the_load_and_leaves_nothing(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(populate, "REGION", REGION)
    monkeypatch.setattr(populate, "THREADS", 1)
    calls = 0

    def full_after_two(fd: int, offset: int, length: int) -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.posix_fallocate(fd, offset, length)

    monkeypatch.setattr(populate, "_fallocate", full_after_two)
    fds = _open_fds()
    async with CpuShmSink(shm_dir) as sink, asyncio.TaskGroup() as tasks:
        registry, model, uri, recent = await _start(tmp_path, sink, tasks)
        arena = _arena_size(tmp_path / "models" / "m" / "model.safetensors")
        async with asyncio.timeout(20):
            with pytest.raises(ResourceExhausted) as info:
                await model.done
        assert info.value.message == (
            f"loading {uri} needs {arena} bytes of shared memory but only {2 * REGION} are "
            "available (budget unset, in use 0); evict a model with `tensorferry evict` or "
            "raise [memory] shm_budget"
        )
        assert calls == 3
        assert _segments(shm_dir) == []
        assert sink.used == 0
        [record] = recent
        assert record.outcome == "failed"
        registry.close()
    # (The arena's own mapping may outlive the load until the collector frees the failure's
    # traceback, as before: the reservation's descriptor may not.)
    assert len(_open_fds()) <= len(fds) + 1


async def test_a_reservation_stopped_early_fails_the_ranges_waiting_past_it(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Waiters woken with a CancelledError would count as cancelled in their TaskGroup, not
    # failed: the fetch would return as if ranges never fetched had landed.
    monkeypatch.setattr(populate, "REGION", REGION)
    monkeypatch.setattr(populate, "THREADS", 1)
    held = Held(free=1)
    monkeypatch.setattr(populate, "_fallocate", held)
    path = shm_dir / "arena"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4 * REGION)
    mapping = mmap.mmap(fd, 4 * REGION)
    reservation = populate.Reservation(
        fd, populate.address_of(mapping), 0, 4 * REGION,
        refuse=lambda n: ResourceExhausted("never"),
    )  # fmt: skip
    landed: list[int] = []

    async def range_into(end: int) -> None:
        await reservation.ready(end)
        landed.append(end)

    async def fetch() -> None:
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            tg.create_task(reservation.run())
            for end in (REGION, 3 * REGION, 4 * REGION):
                tg.create_task(range_into(end))
            assert await asyncio.to_thread(held.entered.wait, 10)
            reservation.stop()
            held.release.set()

    with pytest.raises(ExceptionGroup) as info:
        await fetch()
    assert landed == [REGION]
    messages = {str(exc) for exc in info.value.exceptions if isinstance(exc, InternalError)}
    assert messages == {
        f"arena reservation was stopped at byte {2 * REGION} of {4 * REGION}: the ranges "
        "past it have no memory under them; load the model again"
    }
    assert len(info.value.exceptions) == 2
    mapping.close()


async def test_a_warm_pool_is_no_larger_than_the_recycle_budget(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Larger, it would be populated and then dropped by the first arena released.
    monkeypatch.setattr(populate, "REGION", REGION)
    async with CpuShmSink(shm_dir, recycle_budget=2 * REGION, warm_bytes=8 * REGION) as sink:
        await sink.pool.fill()
        assert sink.recycled_bytes == 2 * REGION
        [segment] = _segments(shm_dir)
        assert (shm_dir / segment).stat().st_size == 2 * REGION
    assert _segments(shm_dir) == []
