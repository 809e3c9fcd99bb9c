"""The fetch on K cores: range GETs spread over fetch workers, each with its own event loop
and its own warm connections, writing straight into the destination.

The daemon keeps the control plane: the scheduler, the pace, hedging, retries and their
budgets, SlowDown back-off and presigning all stay per load in the main process, which
hands each GET (a presigned URL, its headers, and where its bytes go) to the least busy
worker. ``WorkerPool`` has ``HttpPool.get_into``'s surface, so the store layer does not
know which of them it talks to. A destination no worker can reach (a hedge's spare buffer,
a GPU ring in private memory) is fetched in the main process by the local pool, as
without workers.

Workers are processes (each has its own interpreter: the GIL is not shared) or threads
(``[fetch] worker_mode``); see docs/architecture.md for the measurement that chose.
"""

from __future__ import annotations

import asyncio
import logging
import math
from types import TracebackType
from typing import Any

from tensorferry import env
from tensorferry.daemon.config.settings import S3Settings
from tensorferry.daemon.config.values import AUTO
from tensorferry.daemon.fetch.regions import Region, Regions
from tensorferry.daemon.fetch.worker_link import WorkerCounts, WorkerLink
from tensorferry.daemon.store._http import HttpPool
from tensorferry.daemon.store.base import StoreEvents
from tensorferry.v1 import tensorferry_pb2 as pb

log = logging.getLogger(__name__)
MODES = ("process", "thread")
#: Bytes per second one worker core moves, between HTTPS (~0.8 GB/s) and plain HTTP (~3 GB/s).
PER_WORKER_BPS = 1.5e9
#: Seconds between looks for arenas unmapped since (collected ones are dropped at once).
_SWEEP = 1.0
_RESTART_BACKOFF = (0.1, 5.0)
#: GETs in flight a range's own worker may have beyond the least busy one's (``_pick``).
_SLACK = 8


def worker_count(setting: int, mode: str, link_bps: float, cores: int) -> int:
    """How many fetch workers ``[fetch] workers`` and ``worker_mode`` ask for: 0 is none,
    as ``worker_mode = "off"`` is; ``AUTO`` is derived from the link and the cores."""
    if mode == "off":
        return 0
    return auto_workers(link_bps, cores) if setting == AUTO else setting


def worker_config(s: S3Settings) -> dict[str, Any]:
    """What a fetch worker's connection pool is built from: no credentials (presigned URLs
    come with each GET), the proxy settings as this process reads them."""
    return {
        # Every load's GETs to one host share these: as many as a load may grow to.
        "limit": max(s.concurrency, s.max_concurrency),
        "connect_timeout": s.connect_timeout,
        "read_timeout": s.read_timeout,
        "proxy": s.proxy,
        "proxy_variables": env.proxy_variables(),
        "fallback": s.proxy_fallback,
        "ca_bundle": str(s.ca_bundle) if s.ca_bundle is not None else None,
    }


def auto_workers(link_bps: float, cores: int) -> int:
    """``[fetch] workers = "auto"``: enough workers for the link, leaving the main process a
    core; none (every GET in the main process) where the host has no core to spare."""
    if cores <= 2:
        return 0
    return max(1, min(cores // 2, math.ceil(link_bps / PER_WORKER_BPS)))


class WorkerPool:
    """K fetch workers behind ``HttpPool``'s ``get_into``; ``local`` serves the rest."""

    def __init__(
        self, local: HttpPool, count: int, mode: str, config: dict[str, Any],
        events: StoreEvents,
    ) -> None:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"worker mode {mode!r}")
        self.local = local
        self.mode = mode
        self._config = config
        self._events = events
        self.counts = [WorkerCounts(i, mode) for i in range(count)]
        self._links: list[WorkerLink | None] = [None] * count
        self.regions = Regions(self._dropped)
        #: The supervisors (``_keep`` per worker, ``_sweep``): the pool's own tasks, awaited
        #: in ``__aexit__``, so a worker's failure never reaches the task that entered it.
        self._keepers: list[asyncio.Task[None]] = []
        #: Whether each keeper has a live link to run (it reaps that one itself); one that
        #: has none is cancelled at exit rather than waited for.
        self._in_run = [True] * count
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> WorkerPool:
        self.regions.bind(asyncio.get_running_loop())
        links = [WorkerLink(c, self._config, self._events) for c in self.counts]
        try:
            async with asyncio.TaskGroup() as tg:
                for link in links:
                    tg.create_task(link.start())
        except BaseException:
            for link in links:
                await link.stop()
            raise
        self._links = list(links)
        self._keepers = [
            asyncio.create_task(self._keep(index), name=f"tensorferry-fetch-keep-{index}")
            for index in range(len(links))
        ]
        if self.mode == "process":
            self._sweeper = asyncio.create_task(self._sweep(), name="tensorferry-fetch-sweep")
        log.info("%d fetch workers (%s mode): pids %s", len(links), self.mode,
                 " ".join(str(c.pid) for c in self.counts))  # fmt: skip
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        for link in self._links:
            if link is not None:
                link.close()  # each worker ends its GETs and exits; _keep reaps it
        tasks = list(self._keepers)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
            self._sweeper.cancel()
        for index, keeper in enumerate(self._keepers):
            if not self._in_run[index]:  # waiting to start another: none is wanted now
                keeper.cancel()
        cancelled: asyncio.CancelledError | None = None
        try:
            pending = set(tasks)
            while pending:  # a worker still writes into arenas until reaped: wait for all
                try:
                    _, pending = await asyncio.wait(pending)
                except asyncio.CancelledError as exc:
                    cancelled = cancelled or exc
            for task in tasks:
                if not task.cancelled() and (failed := task.exception()) is not None:
                    log.error("fetch worker supervisor failed", exc_info=failed)
        finally:
            self.regions.close()
        if cancelled is not None:
            raise cancelled

    async def _keep(self, index: int) -> None:
        """Run worker ``index``; when it dies, log it and start another."""
        backoff = _RESTART_BACKOFF[0]
        while True:
            link = self._links[index]
            if link is not None:
                self._in_run[index] = True
                try:
                    await link.run()
                except Exception as exc:  # never the caller's: the pool serves on
                    link.why = link.why or f"fetch worker {index} failed: {exc!r}"
                    log.exception("fetch worker %d link failed", index)
                finally:
                    self._in_run[index] = False
                if self._closing:
                    return
                self._links[index] = None
                log.warning("%s; starting another", link.why)
            if self._closing:
                return
            await asyncio.sleep(backoff)
            if self._closing:
                return
            fresh = WorkerLink(self.counts[index], self._config, self._events)
            try:
                await fresh.start()
            except Exception as exc:
                backoff = min(backoff * 2, _RESTART_BACKOFF[1])
                log.error("fetch worker %d did not start again: %s", index, exc)
                continue
            backoff = _RESTART_BACKOFF[0]
            self.counts[index].restarts += 1
            self._links[index] = fresh
            if self._closing:
                fresh.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP)
            self.regions.sweep()

    def _dropped(self, region: Region) -> None:
        """A region went (its arena unmapped): the workers that mapped it unmap it too.
        On the event loop's thread (``Regions`` hands a collector thread's drop to it)."""
        for link in self._links:
            if link is not None:
                link.unshare(region.rid)

    def _pick(self, key: tuple[int, int] | None = None) -> WorkerLink | None:
        """The least busy worker; for a ``key`` (region, offset), the one that wrote those
        bytes before, unless it is busier than that by more than ``_SLACK`` GETs.

        A worker process writes through its own mapping, whose page tables it fills once
        per range (0.2 CPU-s per GiB): a recycled arena refilled with the same model's
        ranges costs nothing more where each range goes back to the same worker.
        """
        alive = [link for link in self._links if link is not None and link.alive]
        if not alive:
            return None
        best = min(alive, key=lambda link: link.inflight)
        if key is not None:
            home = self._links[hash(key) % len(self._links)]
            if home is not None and home.alive and home.inflight <= best.inflight + _SLACK:
                return home
        return best

    async def get_into(
        self, url: str, headers: dict[str, str], dest: memoryview, start: int
    ) -> None:
        """As ``HttpPool.get_into``, by a worker where one can reach ``dest``."""
        if not len(dest) or not any(link is not None and link.alive for link in self._links):
            await self.local.get_into(url, headers, dest, start)
            return
        if self.mode == "thread":
            link = self._pick()
            assert link is not None
            await link.call(url, headers, None, dest, start)
            return
        found = self.regions.find(dest)
        if found is None:
            await self.local.get_into(url, headers, dest, start)
            return
        region, offset = found
        link = self._pick((region.rid, offset))
        assert link is not None
        link.share(region)
        await link.call(url, headers, (region.rid, region.size, offset), dest, start)

    @property
    def open_connections(self) -> int:
        return self.local.open_connections + sum(c.open_connections for c in self.counts)

    @property
    def busy_connections(self) -> int:
        # A worker reports its figures every half second, but a connection is busy only
        # while a GET the daemon handed it is not done: none once they all are.
        busy = (
            min(c.busy_connections, link.inflight)
            for c, link in zip(self.counts, self._links, strict=True)
            if link is not None
        )
        return self.local.busy_connections + sum(busy)

    @property
    def fallbacks(self) -> int:
        return self.local.fallbacks + sum(c.fallbacks for c in self.counts)

    def status(self) -> list[pb.FetchWorker]:
        return [
            pb.FetchWorker(
                index=c.index,
                mode=c.mode,
                pid=c.pid,
                bytes=c.bytes,
                gets=c.gets,
                cpu_seconds=c.cpu_seconds,
                restarts=c.restarts,
                connections_open=c.open_connections,
            )
            for c in self.counts
        ]

    def pids(self) -> list[int]:
        """The worker processes alive now (none in thread mode)."""
        alive = (link for link in self._links if link is not None and link.proc is not None)
        return [link.proc.pid for link in alive if link.proc is not None and link.alive]
