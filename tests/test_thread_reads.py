"""Reads that run in threads stop writing before their cancelled task returns (issue #25):
a hedge's spare buffer or a GPU ring slot is handed to the next range as soon as the read
into it is cancelled, so a thread still writing would put one range's bytes in another's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.store.cache import CachingStore, DiskTier
from tensorferry.daemon.store.local import LocalStore
from tensorferry.daemon.threads import STEP, run_to_end

SIZE = 3 * STEP
PATTERN = bytes(range(256)) * (SIZE // 256)


class GatedPreadv:
    """``os.preadv`` whose first call waits until the test opens the gate."""

    def __init__(self) -> None:
        self.real = os.preadv
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self.real(fd, buffers, offset)


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """The loop's threads, so a test can wait until every one of them has ended."""
    pool = concurrent.futures.ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


def local_store(tmp_path: Path) -> tuple[Store, ObjectInfo]:
    root = tmp_path / "src"
    root.mkdir()
    (root / "model.safetensors").write_bytes(PATTERN)
    store = LocalStore(root, f"{root}/")
    [obj] = asyncio.run(store.list_objects())
    return store, obj


def cached_store(tmp_path: Path) -> tuple[Store, ObjectInfo]:
    inner, obj = local_store(tmp_path)
    store = CachingStore(inner, DiskTier(tmp_path / "tier", 4 * SIZE))
    asyncio.run(store.read_into(obj, 0, memoryview(bytearray(SIZE))))  # now in the tier
    return store, obj


@pytest.mark.parametrize("make", [local_store, cached_store], ids=["local", "disk-tier"])
async def test_a_cancelled_read_has_stopped_writing_when_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    executor: concurrent.futures.ThreadPoolExecutor, make: Any,
) -> None:  # fmt: skip
    store, obj = await asyncio.to_thread(make, tmp_path)
    asyncio.get_running_loop().set_default_executor(executor)
    preadv = GatedPreadv()
    monkeypatch.setattr(os, "preadv", preadv)
    dest = bytearray(SIZE)
    read = asyncio.create_task(store.read_into(obj, 0, memoryview(dest)))
    while not preadv.entered.is_set():  # noqa: ASYNC110 (a thread's event: polled)
        await asyncio.sleep(0.005)
    read.cancel()
    # Time for a cancellation that does not wait for its thread to complete.
    await asyncio.wait([read], timeout=0.2)
    if read.done():  # returned with the thread still inside preadv: dest as the caller sees it
        after_cancel = bytes(dest)
        preadv.gate.set()
    else:
        preadv.gate.set()
        await asyncio.wait([read])
        after_cancel = bytes(dest)
    assert read.cancelled()
    executor.shutdown(wait=True)  # every thread the read started has ended
    assert bytes(dest) == after_cancel, "the read wrote into dest after it was cancelled"
    assert preadv.calls == 1  # it stopped within one step, not after the whole range


async def test_run_to_end_waits_through_repeated_cancellation() -> None:
    started, gate, ended = threading.Event(), threading.Event(), threading.Event()
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("the caller's context")

    stopped: list[bool] = []

    def work(stop: threading.Event, label: str) -> str:
        started.set()
        gate.wait(30)
        stopped.append(stop.is_set())
        ended.set()
        return f"{label} in {var.get()}"

    assert await run_to_end(lambda stop: f"plain in {var.get()}") == "plain in the caller's context"
    task = asyncio.create_task(run_to_end(work, "work"))
    await asyncio.to_thread(started.wait, 30)
    for _ in range(3):  # cancelled again and again: still waits for the thread
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
        assert not task.done()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set()
    assert stopped == [True]  # told to stop when first cancelled


async def test_a_timeout_is_raised_once_the_thread_has_returned() -> None:
    ended = threading.Event()

    def work(stop: threading.Event) -> None:
        while not stop.wait(0.01):  # a read in steps, looking at stop between them
            pass
        ended.set()
        raise OSError("failed after it was cancelled: nobody is told")

    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))

    async def timed() -> None:
        async with asyncio.timeout(0.05):
            await run_to_end(work)

    with pytest.raises(TimeoutError):
        await timed()
    assert ended.is_set()
    gc.collect()  # an unretrieved exception would be reported as its future is collected
    assert errors == []
