"""A fetch worker: range GETs on its own event loop and its own warm connections, into
memory the daemon names.

The same ``serve`` runs in a child process (``python -m tensorferry.daemon.fetch.worker_main``,
destinations in regions it maps from passed file descriptors) or in a thread of the daemon
(destinations handed over in process). It holds no credentials: each GET comes as a
presigned URL. Everything the daemon's control plane watches comes back as messages: when
each GET went out and when its first byte came (the hedger), body bytes as they arrive
(the pace), proxy fallbacks, how each GET ended (errors as data, ``wire``), and the
worker's CPU seconds and connections (Status).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tensorferry.daemon.fetch import wire
from tensorferry.daemon.fetch.regions import Mapped
from tensorferry.daemon.store._http import HttpPool
from tensorferry.daemon.store.base import METER, TIMING, BodyMeter, GetTiming, StoreEvents
from tensorferry.daemon.store.proxy import ProxyChooser

#: How often body bytes are reported (the pace samples every 0.5 s) and, every
#: ``_STATS_EVERY``-th time, the worker's CPU seconds and connections.
TICK = 0.1
_STATS_EVERY = 5
_PR_SET_PDEATHSIG = 1

Say = Callable[[wire.Message], None]


class Destinations(Protocol):
    def view(self, cid: int, where: Any, length: int) -> memoryview: ...

    def drop(self, rid: int) -> None: ...

    def drain(self) -> None: ...


class _Timing(GetTiming):
    """A GET's timing that tells the daemon as each moment is known."""

    def __init__(self, say: Say, cid: int) -> None:
        super().__init__()
        self._say, self._cid = say, cid

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "sent" and value is not None and "_cid" in self.__dict__:
            self._say(("sent", self._cid, value))

    def answered(self, now: float) -> None:
        self.first_byte = now
        self._say(("first", self._cid, now))


class _Events(StoreEvents):
    def __init__(self, say: Say) -> None:
        super().__init__()
        self._say = say

    def fell_back(self) -> None:
        self._say(("fellback",))


@dataclasses.dataclass(eq=False)
class _Call:
    meter: BodyMeter = dataclasses.field(default_factory=BodyMeter)
    reported: int = 0
    task: asyncio.Task[None] | None = None

    def delta(self) -> int:
        n, self.reported = self.meter.bytes - self.reported, self.meter.bytes
        return n


def pool_from_config(
    config: dict[str, Any], events: StoreEvents, proxies: ProxyChooser | None = None
) -> HttpPool:
    """The connection pool ``workers.worker_config`` describes: a worker's, and the daemon's
    own (which passes the ``proxies`` it also uses for store calls)."""
    ca = config["ca_bundle"]
    return HttpPool(
        limit=config["limit"],
        connect_timeout=config["connect_timeout"],
        read_timeout=config["read_timeout"],
        proxies=proxies or ProxyChooser(config["proxy"], config["proxy_variables"]),
        fallback=config["fallback"],
        ca_bundle=Path(ca) if ca else None,
        events=events,
    )


async def serve(sock: socket.socket, dests: Destinations, cpu: Callable[[], float]) -> None:
    """Serve the daemon's GETs on ``sock`` until it closes its end; then stop them all."""
    reader, writer = await asyncio.open_connection(sock=sock)

    def say(message: wire.Message) -> None:
        if not writer.is_closing():
            # The daemon gone: its end of the stream says so to the loop below.
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(wire.pack(message))

    first = await wire.receive(reader)
    if first is None or first[0] != "config":
        writer.close()
        return
    pool = pool_from_config(first[1], _Events(say))
    calls: dict[int, _Call] = {}

    async def get(cid: int, url: str, headers: dict[str, str], where: Any, length: int,
                  start: int) -> None:  # fmt: skip
        call = calls[cid]
        METER.set(call.meter)
        TIMING.set(_Timing(say, cid))
        failure: wire.Failure = None
        try:
            await pool.get_into(url, headers, dests.view(cid, where, length), start)
        except asyncio.CancelledError:
            failure = ("cancelled",)
            raise
        except Exception as exc:
            failure = wire.encode(exc)
        finally:
            # Only now: the GET's connection is closed or idle, and writes nothing more.
            calls.pop(cid, None)
            if n := call.delta():
                say(("bytes", ((cid, n),)))
            say(("done", cid, failure))
            if not calls:  # idle: the daemon's figures should say so now
                say(("stats", cpu(), pool.open_connections, pool.busy_connections))

    def unstarted(cid: int, _: asyncio.Task[None]) -> None:
        # A GET cancelled before its task first ran never reached its own ``finally``.
        if calls.pop(cid, None) is not None:
            say(("done", cid, ("cancelled",)))

    def _on(message: wire.Message) -> None:
        kind = message[0]
        if kind == "get":
            dests.drain()
            cid = message[1]
            task = tg.create_task(get(*message[1:]))
            calls[cid] = _Call(task=task)
            task.add_done_callback(functools.partial(unstarted, cid))
        elif kind == "cancel":
            cancelled = calls.get(message[1])
            if cancelled is not None and cancelled.task is not None:
                cancelled.task.cancel()
        elif kind == "drop":
            dests.drop(message[1])
        else:
            wire.odd(f"the daemon sent an unknown message {kind!r}")

    say(("ready", os.getpid()))
    try:
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(_report(say, calls, pool, cpu, dests))
            while (message := await wire.receive(reader)) is not None:
                try:
                    _on(message)
                except (IndexError, TypeError, ValueError, KeyError) as exc:
                    wire.odd(f"the daemon sent {message[0]!r} that does not fit ({exc})")
            # The daemon closed its end (stopping, or gone): nobody waits for these.
            ticker.cancel()
            for call in calls.values():
                if call.task is not None:
                    call.task.cancel()
    finally:
        await pool.aclose()
        writer.close()


async def _report(say: Say, calls: dict[int, _Call], pool: HttpPool,
                  cpu: Callable[[], float], dests: Destinations) -> None:  # fmt: skip
    ticks = 0
    while True:
        await asyncio.sleep(TICK)
        dests.drain()  # an idle worker too keeps the daemon's descriptor sends from failing
        moved = tuple((cid, n) for cid, call in list(calls.items()) if (n := call.delta()))
        if moved:
            say(("bytes", moved))
        ticks += 1
        if ticks % _STATS_EVERY == 0:
            say(("stats", cpu(), pool.open_connections, pool.busy_connections))


class InProcess:
    """A thread worker's destinations: the daemon's own memoryviews, by call id."""

    def __init__(self) -> None:
        self.views: dict[int, memoryview] = {}

    def view(self, cid: int, where: Any, length: int) -> memoryview:
        return self.views[cid]

    def drop(self, rid: int) -> None:
        pass

    def drain(self) -> None:
        pass


def run_thread(sock: socket.socket, dests: InProcess) -> None:
    """A thread worker's body: its own event loop until the daemon closes the socket."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(sock, dests, time.thread_time))


class _Regions:
    """A process worker's destinations: slices of the regions it has mapped."""

    def __init__(self, fds: socket.socket) -> None:
        self._fds = fds
        self.mapped = Mapped(self._receive)

    def _receive(self) -> tuple[int, int, int] | None:
        """The next region the daemon sent, or None when none waits (or it has gone)."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._fds, 64, 1, socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: none waiting; others: the channel is gone
                return None
            if not fds:
                return None  # the daemon closed the channel (it never sends no descriptor)
            try:
                rid, size = (int(x) for x in message.decode().split())
            except ValueError:
                for fd in fds:
                    os.close(fd)
                wire.odd(f"a region message {message!r} that does not decode")
                continue
            return rid, size, fds[0]

    def drain(self) -> None:
        self.mapped.drain()

    def view(self, cid: int, where: Any, length: int) -> memoryview:
        rid, size, offset = where
        return self.mapped.view(rid, size, offset, length)

    def drop(self, rid: int) -> None:
        self.mapped.drop(rid)


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _die_with_parent(parent: int) -> None:
    """Killed when the daemon dies, however it dies: no orphan holds arenas or sockets."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the death signal was armed
        os._exit(1)


def main() -> None:
    data_fd, fds_fd, parent = (int(arg) for arg in sys.argv[1:4])
    _die_with_parent(parent)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s fetch worker {os.getpid()}: %(message)s",
    )  # fmt: skip
    # The daemon stops its workers by closing their sockets, after its loads: a Ctrl-C or
    # a SIGTERM to the whole group must not end them first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=data_fd)
    fds = socket.socket(fileno=fds_fd)
    fds.setblocking(False)  # read between GETs, never waited on (``Mapped.drain``)
    dests = _Regions(fds)
    import uvloop

    try:
        uvloop.run(serve(sock, dests, _process_cpu))
    finally:
        dests.mapped.close()
        with contextlib.suppress(OSError):
            fds.close()


if __name__ == "__main__":
    main()
