"""Fetch workers (``daemon/fetch/workers.py``) against SeaweedFS and stalling servers on
loopback: ranges land byte-exact in a shared-memory file through worker processes and
threads, a cancelled GET returns only once its worker has stopped writing, a killed worker
fails its GETs as retryable and is replaced, and errors come back as the same types."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorferry.daemon.fetch import wire
from tensorferry.daemon.fetch.workers import WorkerPool
from tensorferry.daemon.store._http import HttpError, HttpPool, OtherVersionAnswer
from tensorferry.daemon.store._http_head import RangeMismatch
from tensorferry.daemon.store.base import METER, TIMING, BodyMeter, GetTiming, StoreEvents
from tensorferry.daemon.store.proxy import ProxyFailed
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import FailedPrecondition, SourceChanged
from tests.conftest import BUCKET
from tests.test_http_pool import serving

SIZE = 24 << 20
CHUNK = 1 << 20
CONFIG: dict[str, Any] = {
    "limit": 64, "connect_timeout": 10.0, "read_timeout": 30.0, "proxy": None,
    "proxy_variables": {}, "fallback": True, "ca_bundle": None,
}  # fmt: skip


def _local() -> HttpPool:
    return HttpPool(limit=64, connect_timeout=10.0, read_timeout=30.0)


@contextlib.asynccontextmanager
async def workers(count: int, mode: str = "process") -> AsyncIterator[WorkerPool]:
    local = _local()
    try:
        async with WorkerPool(local, count, mode, CONFIG, StoreEvents()) as pool:
            yield pool
    finally:
        await local.aclose()


@contextlib.contextmanager
def shm_file(size: int) -> Iterator[mmap.mmap]:
    """A /dev/shm file mapped shared, as a CPU arena is."""
    path = Path(f"/dev/shm/tf-test-workers-{os.getpid()}-{time.monotonic_ns()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        gc.collect()  # a failed GET's traceback may hold a slice (as cpu_shm knows)
        mapping.close()
        path.unlink()


@pytest.fixture(scope="module")
def blob(s3: S3Server) -> tuple[str, bytes, str]:
    """A presigned URL of a 24 MiB object, its bytes and its ETag."""
    data = os.urandom(SIZE)
    client = s3.client()
    key = f"workers-{os.getpid()}/blob"
    etag = client.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"]
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    return url, data, etag


async def _fetch_all(pool: WorkerPool, url: str, etag: str, view: memoryview) -> None:
    async with asyncio.TaskGroup() as tg:
        for start in range(0, len(view), CHUNK):
            dest = view[start : start + CHUNK]
            tg.create_task(pool.get_into(url, {"If-Match": etag}, dest, start))


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_ranges_land_byte_exact_spread_over_workers(
    blob: tuple[str, bytes, str], mode: str
) -> None:
    url, data, etag = blob

    async def main() -> None:
        async with workers(2, mode) as pool:
            with shm_file(SIZE) as arena:
                meter = BodyMeter()
                METER.set(meter)
                await _fetch_all(pool, url, etag, memoryview(arena))
                assert arena[:] == data
                # Body bytes reached the load's meter (the pace reads it) in the main process;
                # those that came with an answer's head are not counted, as without workers.
                assert SIZE - (SIZE // CHUNK) * (64 << 10) <= meter.bytes <= SIZE
            assert [c.gets for c in pool.counts] != [24, 0]
            assert sum(c.gets for c in pool.counts) == SIZE // CHUNK
            assert all(c.gets > 0 for c in pool.counts), pool.counts
            assert sum(c.bytes for c in pool.counts) == SIZE
            if mode == "process":
                assert len(set(pool.pids())) == 2
                assert os.getpid() not in pool.pids()

    asyncio.run(main())


def test_a_memfd_mapping_is_shared_through_the_descriptor_the_daemon_holds(
    blob: tuple[str, bytes, str],
) -> None:
    """The GPU ring is a memfd mapped shared (``gpu/ring.py``): it has no path to open, but
    the daemon holds its descriptor, and the workers write into its slots."""
    url, data, etag = blob

    async def main() -> None:
        fd = os.memfd_create("tf-test-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 4 * CHUNK)
            ring = mmap.mmap(fd, 4 * CHUNK)
            async with workers(2) as pool:
                view = memoryview(ring)
                await _fetch_all(pool, url, etag, view[: 4 * CHUNK])
                assert ring[:] == data[: 4 * CHUNK]
                assert sum(c.gets for c in pool.counts) == 4
                assert len(pool.regions) == 1
                view.release()
                ring.close()
                pool.regions.sweep()  # a closed mapping's region goes from every worker
                assert len(pool.regions) == 0
        finally:
            os.close(fd)

    asyncio.run(main())


def test_private_memory_is_fetched_in_the_daemon(blob: tuple[str, bytes, str]) -> None:
    """A hedge's spare buffer (or a ring in private memory) is no worker's to write."""
    url, data, etag = blob

    async def main() -> None:
        async with workers(1) as pool:
            spare = bytearray(CHUNK)
            await pool.get_into(url, {"If-Match": etag}, memoryview(spare), CHUNK)
            assert spare == data[CHUNK : 2 * CHUNK]
            assert pool.counts[0].gets == 0

    asyncio.run(main())


def test_errors_come_back_as_the_same_types(blob: tuple[str, bytes, str]) -> None:
    url = blob[0]

    async def main() -> None:
        async with workers(1) as pool:
            with shm_file(CHUNK) as arena:
                with pytest.raises(HttpError) as other:  # the store honours If-Match
                    await pool.get_into(url, {"If-Match": '"0123"'}, memoryview(arena), 0)
                assert other.value.status == 412
                with pytest.raises(HttpError) as denied:  # a URL signed for another key
                    await pool.get_into(url.replace("/blob?", "/nope?"), {}, memoryview(arena), 0)
                assert denied.value.status == 403
                assert b"<Code>SignatureDoesNotMatch</Code>" in denied.value.body
                assert pool.counts[0].gets == 0
                del other, denied  # their tracebacks hold slices of the mapping

    asyncio.run(main())


@pytest.mark.parametrize(
    "exc",
    [
        HttpError(503, {"retry-after": "1"}, b"<Code>SlowDown</Code>"),
        OtherVersionAnswer('ETag "b", not the planned "a"'),
        FailedPrecondition("the store answered with gzip"),
        SourceChanged("a stale cache"),
        RangeMismatch("bytes 0-9/10, not 5-9"),
        ProxyFailed("the proxy http://p:1 answered 502"),
        ConnectionResetError("reset"),
        TimeoutError("no data from the store for 30.0 s"),
    ],
)
def test_error_encoding_round_trips(exc: BaseException) -> None:
    back = wire.decode(wire.encode(exc) or ())
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    if isinstance(exc, HttpError):
        assert isinstance(back, HttpError)
        assert (back.status, back.headers, back.body) == (exc.status, exc.headers, exc.body)


@contextlib.asynccontextmanager
async def stalling_store(
    sent: int, more: asyncio.Event | None = None
) -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Event]]:
    """A store that answers a 1 MiB range with its head and ``sent`` bytes, then stalls
    (until ``more`` is set, then sends the rest): (port, bytes sent, connection closed by
    the client)."""
    started, closed = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{CHUNK - 1}/{CHUNK}\r\n"
        writer.write(f"{head}Content-Length: {CHUNK}\r\n\r\n".encode() + b"\xab" * sent)
        await writer.drain()
        started.set()
        try:
            if more is not None:
                await more.wait()
                writer.write(b"\xcd" * (CHUNK - sent))
                await writer.drain()
            await reader.read()  # until the client closes the connection
        except ConnectionError:  # it had closed it already
            pass
        finally:
            closed.set()

    async with serving(handle) as port:
        yield port, started, closed


async def _until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
        await asyncio.sleep(0.01)


def test_cancel_returns_only_after_the_worker_stopped_writing() -> None:
    async def main() -> None:
        more = asyncio.Event()
        async with workers(1) as pool, stalling_store(4096, more) as (port, started, closed):
            with shm_file(CHUNK) as arena:
                view = memoryview(arena)
                timing = GetTiming()
                TIMING.set(timing)
                url = f"http://127.0.0.1:{port}/b/k"
                get = asyncio.create_task(pool.get_into(url, {}, view, 0))
                await started.wait()
                await _until(lambda: arena[4095] == 0xAB, "the first bytes landed")
                await _until(lambda: timing.first_byte is not None, "the first byte reported")
                [pid] = pool.pids()
                os.kill(pid, signal.SIGSTOP)  # the worker cannot answer the cancel now
                try:
                    get.cancel()
                    await asyncio.sleep(0.3)
                    assert not get.done(), "returned before the worker acknowledged"
                finally:
                    os.kill(pid, signal.SIGCONT)
                with pytest.raises(asyncio.CancelledError):
                    await get
                # Acknowledged only once its connection was closed: what the store sends
                # from now on (the rest of the range) must not land.
                landed = arena[:]
                more.set()
                changed = lambda: arena[:] != landed  # noqa: E731
                await _until(lambda: closed.is_set() or changed(), "the connection closed")
                await asyncio.sleep(0.2)  # a worker still reading would have written by now
                assert not changed(), "bytes landed after the cancel was acknowledged"
                assert pool.counts[0].gets == 0
                assert pool.pids() == [pid]
                del view, get

    asyncio.run(main())


def test_killed_worker_fails_its_gets_as_retryable_and_comes_back() -> None:
    async def main() -> None:
        async with workers(1) as pool, stalling_store(100) as (port, started, _):
            with shm_file(CHUNK) as arena:
                url = f"http://127.0.0.1:{port}/b/k"
                get = asyncio.create_task(pool.get_into(url, {}, memoryview(arena), 0))
                await started.wait()
                [pid] = pool.pids()
                os.kill(pid, signal.SIGKILL)
                with pytest.raises(ConnectionError, match=r"fetch worker 0 \(pid \d+\) exited"):
                    await get
                await _until(lambda: pool.counts[0].restarts == 1, "a new worker")
                [fresh] = pool.pids()
                assert fresh != pid
                os.kill(fresh, 0)
                del get

    asyncio.run(main())
