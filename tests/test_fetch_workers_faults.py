"""Fetch workers that die, stall or are sent odd things (``daemon/fetch/workers.py``,
``worker_link.py``, ``worker_main.py``): the daemon serves on and replaces a worker that
died under a write, a GET cancelled before its worker ran it leaves no arena mapped or
open in the worker, and the pool stops its workers, also those it is restarting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tensorferry.daemon.config.settings import load_settings
from tensorferry.daemon.config.values import AUTO
from tensorferry.daemon.fetch import wire
from tensorferry.daemon.fetch.regions import Mapped
from tensorferry.daemon.fetch.workers import auto_workers, worker_count
from tensorferry.errors import InternalError
from tests.test_fetch_workers import CHUNK, _until, shm_file, stalling_store, workers


def _state(pid: int) -> str:
    """The process's state letter (R, S, T stopped, Z dead and not reaped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, state: str) -> None:
    """Polled without running the event loop: it must not see the worker's end first."""
    deadline = time.monotonic() + 10
    while _state(pid) != state:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {state}"
        time.sleep(0.005)


def _holds(pid: int, name: str) -> list[str]:
    """What of ``name`` the process has mapped or open."""
    maps = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if name in line]
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if name in (target := os.readlink(f"/proc/{pid}/fd/{fd}")):
                fds.append(target)
    return maps + fds


def test_a_worker_that_died_under_a_write_is_replaced_and_the_daemon_serves_on() -> None:
    async def main() -> None:
        async with workers(1) as pool, stalling_store(CHUNK) as (port, _, _):
            [pid] = pool.pids()
            os.kill(pid, signal.SIGKILL)
            _wait_state(pid, "Z")
            # As a GET dispatched now: the write fails (EPIPE) before the end is read.
            link = pool._links[0]
            assert link is not None
            assert link._say(("cancel", 12345))
            await _until(lambda: pool.counts[0].restarts == 1, "a new worker")
            with shm_file(CHUNK) as arena:
                view = memoryview(arena)
                await pool.get_into(f"http://127.0.0.1:{port}/b/k", {}, view, 0)
                assert arena[:] == b"\xab" * CHUNK
                assert pool.counts[0].gets == 1
                del view
            assert pool.counts[0].restarts == 1

    asyncio.run(main())


def test_a_get_cancelled_before_its_worker_ran_it_leaves_no_arena_in_the_worker() -> None:
    async def main() -> None:
        async with workers(1) as pool, stalling_store(4096) as (port, started, _):
            url = f"http://127.0.0.1:{port}/b/k"
            [pid] = pool.pids()
            with shm_file(CHUNK) as first:
                name = Path(os.readlink(f"/proc/self/map_files/{_range_of(first)}")).name
                os.kill(pid, signal.SIGSTOP)
                _wait_state(pid, "T")
                view = memoryview(first)
                try:
                    get = asyncio.create_task(pool.get_into(url, {}, view, 0))
                    await _until(lambda: pool._links[0].inflight == 1, "the GET sent")  # type: ignore[union-attr]
                    get.cancel()
                    await asyncio.sleep(0.1)
                finally:
                    os.kill(pid, signal.SIGCONT)
                with pytest.raises(asyncio.CancelledError):
                    await get
                view.release()  # its failure's traceback holds it still
                del get
                gc.collect()
                pool.regions.close()  # as when the arena's mapping goes
            with shm_file(CHUNK) as second:
                view = memoryview(second)
                get = asyncio.create_task(pool.get_into(url, {}, view, 0))
                await started.wait()
                # The next region's GET writes into its own arena, not the dropped one.
                await _until(lambda: second[4095] == 0xAB, "the bytes landed in the new arena")
                assert _holds(pid, name) == []
                get.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await get
                view.release()
                del get

    asyncio.run(main())


def _range_of(mapping: object) -> str:
    """``/proc/self/map_files`` name of the mapping that holds ``mapping``'s first byte."""
    from tensorferry.daemon.fetch.regions import address

    base = address(mapping)  # type: ignore[arg-type]
    for line in Path("/proc/self/maps").read_text().splitlines():
        span = line.split()[0]
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= base < end:
            return span
    raise AssertionError("not mapped")


def test_a_region_never_sent_fails_the_get_and_never_waits() -> None:
    mapped = Mapped(lambda: None)
    with pytest.raises(InternalError) as info:
        mapped.view(7, CHUNK, 0, CHUNK)
    assert info.value.message == (
        "fetch worker: region 7 was never sent before a GET into it; this is a tensorferry "
        "bug: report it with the daemon's log"
    )


def test_a_dropped_region_queued_unmapped_has_its_descriptor_closed() -> None:
    fd = os.memfd_create("tf-test-queued")
    sent = [(3, CHUNK, fd)]
    mapped = Mapped(lambda: sent.pop() if sent else None)
    mapped.drop(3)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_odd_messages_are_ignored_and_a_worker_bug_is_an_internal_error() -> None:
    bug = wire.decode(("bug", "KeyError: 3"))
    assert isinstance(bug, InternalError)
    assert bug.message == (
        "a fetch worker failed a GET with an error it should not raise (KeyError: 3); this "
        "is a tensorferry bug: report it with the daemon's log"
    )

    async def main() -> None:
        reader = asyncio.StreamReader()
        body = b"\xff\x00"  # no marshal type
        reader.feed_data(len(body).to_bytes(4, "little") + body + wire.pack(("done", 1, None)))
        reader.feed_eof()
        assert await wire.receive(reader) == ("done", 1, None)
        assert await wire.receive(reader) is None

    asyncio.run(main())


def test_a_name_lookup_failure_keeps_its_type() -> None:
    import socket

    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    back = wire.decode(wire.encode(exc) or ())
    assert type(back) is socket.gaierror
    assert (back.errno, str(back)) == (exc.errno, str(exc))


def test_workers_stop_with_the_pool() -> None:
    async def main() -> list[int]:
        async with workers(2) as pool:
            pids = pool.pids()
            assert len(pids) == 2
        return pids

    for pid in asyncio.run(main()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_auto_workers() -> None:
    assert auto_workers(1.25e9, 2) == 0  # CI's 2 cores: every GET in the daemon
    assert auto_workers(1.25e9, 8) == 1
    assert auto_workers(12.5e9, 16) == 8
    assert auto_workers(50e9, 64) == 32


@pytest.mark.parametrize(("text", "setting"), [("", AUTO), ('"auto"', AUTO), ("0", 0), ("3", 3)])
def test_zero_fetch_workers_means_none_and_auto_is_the_default(
    tmp_path: Path, text: str, setting: int
) -> None:
    config = tmp_path / "tensorferry.toml"
    config.write_text(f"[fetch]\nworkers = {text}\n" if text else "")
    settings = load_settings(config)
    assert settings.fetch_workers == setting
    want = {AUTO: 8, 0: 0, 3: 3}[setting]
    assert worker_count(settings.fetch_workers, "process", 12.5e9, 16) == want
    assert worker_count(settings.fetch_workers, "off", 12.5e9, 16) == 0


def test_a_socket_that_failed_under_a_write_is_the_end_of_the_stream() -> None:
    # A write to a peer that is gone fails the reader with EPIPE (or ECONNRESET): the
    # other side has ended, for the daemon (it restarts the worker) and the worker (it exits).
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.set_exception(BrokenPipeError(32, "Broken pipe"))
        assert await wire.receive(reader) is None

    asyncio.run(main())


def test_a_region_collected_on_another_thread_is_dropped_on_the_loop() -> None:
    from tensorferry.daemon.fetch.regions import Region, Regions

    async def main() -> None:
        dropped: list[int] = []
        regions = Regions(lambda region: dropped.append(threading.get_ident()))
        regions.bind(asyncio.get_running_loop())
        fd = os.memfd_create("tf-test-region")
        region = Region(1, 0, CHUNK, fd, lambda: None)  # type: ignore[arg-type]
        await asyncio.to_thread(regions.drop, region)  # as a collector's thread would
        await _until(lambda: dropped != [], "the drop run on the loop")
        assert region.fd == -1
        assert dropped == [threading.get_ident()]
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)

    asyncio.run(main())


def test_a_pool_closed_while_a_worker_restarts_starts_none() -> None:
    async def main() -> None:
        async with workers(1) as pool:
            [pid] = pool.pids()
            os.kill(pid, signal.SIGKILL)
            await _until(lambda: pool._links[0] is None, "the dead worker reaped")
        assert pool.counts[0].restarts == 0
        assert pool._links[0] is None

    asyncio.run(main())
