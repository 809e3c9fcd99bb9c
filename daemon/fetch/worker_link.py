"""The daemon's end of one fetch worker (``worker_main``): start it, hand it GETs, and
turn what it reports back into what the control plane watches.

A GET the worker was given is over for the daemon only when the worker says so: on
cancellation the daemon asks the worker to cancel it and waits for the answer before it
re-raises, as ``threads.run_to_end`` waits for a thread, so nothing writes into a
destination that the caller has handed on. A worker that dies fails its GETs as transport
failures (the scheduler retries them, on other workers) once its process is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from tensorferry.daemon.fetch import wire
from tensorferry.daemon.fetch.regions import Region
from tensorferry.daemon.fetch.worker_main import InProcess, run_thread
from tensorferry.daemon.store.base import METER, TIMING, BodyMeter, GetTiming, StoreEvents

log = logging.getLogger(__name__)
#: Seconds a worker has to start, and to stop once its socket is closed.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0


@dataclasses.dataclass(eq=False)
class _Pending:
    done: asyncio.Future[wire.Failure]
    timing: GetTiming | None
    meter: BodyMeter | None


@dataclasses.dataclass
class WorkerCounts:
    """One worker slot's figures, kept across the restarts of its worker."""

    index: int
    mode: str
    pid: int = 0
    bytes: int = 0
    gets: int = 0
    cpu_seconds: float = 0.0  # of the workers that have gone, plus the current one's
    restarts: int = 0
    open_connections: int = 0
    busy_connections: int = 0
    fallbacks: int = 0


class WorkerLink:
    """One worker, process or thread, from start to end; a restart is a new link."""

    def __init__(self, counts: WorkerCounts, config: dict[str, Any], events: StoreEvents) -> None:
        self.counts = counts
        self.mode = counts.mode
        self._config = config
        self._events = events
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._cpu_base = counts.cpu_seconds
        self.inflight = 0
        self.alive = False
        #: What became of the worker, once it is gone (for the log).
        self.why = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._inproc = InProcess()
        self._fds: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        #: Regions whose file this worker was sent (and has mapped, or will at its next GET).
        self.shared: set[int] = set()

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.mode == "process":
                self._fds, fds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._fds.setblocking(False)
                with fds_theirs:
                    self.proc = _spawn(theirs.fileno(), fds_theirs.fileno())
                theirs.close()
                self.counts.pid = self.proc.pid
            else:
                self._thread = threading.Thread(
                    target=run_thread, args=(theirs, self._inproc),
                    name=f"tensorferry-fetch-{self.counts.index}", daemon=True,
                )  # fmt: skip
                self._thread.start()
                self.counts.pid = os.getpid()
            self._reader, self._writer = await asyncio.open_connection(sock=ours)
            self._writer.write(wire.pack(("config", self._config)))
            async with asyncio.timeout(START_TIMEOUT):
                ready = await wire.receive(self._reader)
            if ready is None or ready[0] != "ready":
                raise ConnectionError(f"fetch worker {self.counts.index} did not start")
        except BaseException:
            if self._writer is None:  # else the transport owns ``ours``: stop() closes it
                ours.close()
            await self.stop()
            raise
        self.alive = True

    async def run(self) -> None:
        """Take the worker's messages until it is gone; then fail what it had in flight."""
        assert self._reader is not None
        try:
            while (message := await wire.receive(self._reader)) is not None:
                self._on(message)
        finally:
            self.alive = False
            self.why = await self._reap()
            for pending in self._pending.values():
                if not pending.done.done():
                    pending.done.set_result(wire.gone(self.why))

    def _on(self, message: wire.Message) -> None:
        try:
            self._take(message)
        except (IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
            wire.odd(
                f"fetch worker {self.counts.index} sent {message[0]!r} that does not fit ({exc})"
            )

    def _take(self, message: wire.Message) -> None:
        kind = message[0]
        if kind == "bytes":
            for cid, n in message[1]:
                pending = self._pending.get(cid)
                if pending is not None and pending.meter is not None:
                    pending.meter.bytes += n
        elif kind == "done":
            pending = self._pending.get(message[1])
            if pending is not None and not pending.done.done():
                pending.done.set_result(message[2])
        elif kind == "sent":
            pending = self._pending.get(message[1])
            if pending is not None and pending.timing is not None:
                pending.timing.sent, pending.timing.first_byte = message[2], None
        elif kind == "first":
            pending = self._pending.get(message[1])
            if pending is not None and pending.timing is not None:
                pending.timing.answered(message[2])
        elif kind == "stats":
            self.counts.cpu_seconds = self._cpu_base + message[1]
            self.counts.open_connections, self.counts.busy_connections = message[2], message[3]
        elif kind == "fellback":
            self.counts.fallbacks += 1
            self._events.fell_back()
        else:
            wire.odd(f"fetch worker {self.counts.index} sent an unknown message {kind!r}")

    def share(self, region: Region) -> None:
        """Send the region's file ahead of the first GET into it (sent before that GET's
        message, so it is waiting when the worker looks)."""
        if region.rid in self.shared:
            return
        assert self._fds is not None
        try:
            socket.send_fds(self._fds, [f"{region.rid} {region.size}".encode()], [region.fd])
        except BlockingIOError:  # never on the event loop's time: it takes its GETs elsewhere
            raise ConnectionError(
                f"fetch worker {self.counts.index} (pid {self.counts.pid}) is not taking the "
                "arenas it is sent (its descriptor queue is full: the process is stopped or "
                "stuck); the GET is retried, and if this repeats, kill that process (the "
                "daemon starts another) or set [fetch] workers = 0"
            ) from None
        self.shared.add(region.rid)

    def unshare(self, rid: int) -> None:
        if rid in self.shared:
            self.shared.discard(rid)
            self._say(("drop", rid))

    def _say(self, message: wire.Message) -> bool:
        if self._writer is None or self._writer.is_closing() or not self.alive:
            return False
        try:
            self._writer.write(wire.pack(message))
        except (OSError, RuntimeError):  # the worker is gone: run() sees the end and says so
            return False
        return True

    async def call(
        self, url: str, headers: dict[str, str], where: Any, dest: memoryview, start: int
    ) -> None:
        """The GET, by this worker, into ``dest``; returns or raises as ``HttpPool.get_into``."""
        loop = asyncio.get_running_loop()
        cid = next(self._ids)
        done: asyncio.Future[wire.Failure] = loop.create_future()
        self._pending[cid] = _Pending(done, TIMING.get(), METER.get())
        if self.mode == "thread":
            self._inproc.views[cid] = dest
        self.inflight += 1
        cancelled: asyncio.CancelledError | None = None
        try:
            if not self._say(("get", cid, url, headers, where, len(dest), start)):
                done.set_result(wire.gone(f"fetch worker {self.counts.index} is gone"))
            while not done.done():
                try:
                    await asyncio.wait([done])  # never cancels ``done``: the GET runs on
                except asyncio.CancelledError as exc:
                    if cancelled is None:
                        self._say(("cancel", cid))
                    cancelled = cancelled or exc
        finally:
            self.inflight -= 1
            del self._pending[cid]
            self._inproc.views.pop(cid, None)
        if cancelled is not None:
            raise cancelled
        failure = done.result()
        if failure is not None:
            raise wire.decode(failure)
        self.counts.bytes += len(dest)
        self.counts.gets += 1

    def close(self) -> None:
        """Ask the worker to stop: it cancels its GETs and exits when its socket closes."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    async def stop(self) -> None:
        self.close()
        await self._reap()

    async def _reap(self) -> str:
        """Wait until the worker can write nothing more; what became of it, for messages."""
        self.close()
        if self._fds is not None:
            self._fds.close()
        if self.proc is not None:
            proc = self.proc
            try:
                code = await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = await asyncio.to_thread(proc.wait)
            return f"fetch worker {self.counts.index} (pid {proc.pid}) exited with status {code}"
        if self._thread is not None:
            # No deadline: its GETs write into the daemon's memory until the thread is done.
            await asyncio.to_thread(self._thread.join)
        return f"fetch worker {self.counts.index} (thread) stopped"


def _spawn(data_fd: int, fds_fd: int) -> subprocess.Popen[bytes]:
    """A worker process: spawned, not forked (grpc's fork handlers; see ``offload``), with
    no AWS credentials in its environment: it gets presigned URLs only."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AWS_")}
    module = "tensorferry.daemon.fetch.worker_main"
    argv = [sys.executable, "-P", "-X", "faulthandler", "-m", module]
    argv += [str(data_fd), str(fds_fd), str(os.getpid())]
    return subprocess.Popen(argv, pass_fds=(data_fd, fds_fd), env=env, stdin=subprocess.DEVNULL)
