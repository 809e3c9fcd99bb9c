"""The warm pool: arena memory populated after READY, for a fresh daemon's first load.

``[limits] warm_bytes`` of shared memory are allocated and mapped in the background once
the daemon serves, as a freed arena kept for reuse (``CpuShmSink._free``): the first load
that fits takes it as it takes any recycled arena, and its fetch writes into pages that
are already there. Status counts it as recycled from the start.

A load that arrives while the pool is still being populated stops it where it is
(``settle``): the pool becomes a recycled arena of which a part is reserved, and the load
that takes it reserves the rest alongside its fetch, as it would for a fresh arena.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tensorferry import env
from tensorferry.daemon.sinks.populate import Reservation
from tensorferry.errors import ResourceExhausted

if TYPE_CHECKING:
    from tensorferry.daemon.sinks.cpu_shm import CpuShmSink

log = logging.getLogger(__name__)


class WarmPool:
    """Populates one freed arena of a sink in the background; run ``fill`` in a task."""

    def __init__(self, sink: CpuShmSink, size: int) -> None:
        self.sink = sink
        self.size = size
        self._reservation: Reservation | None = None
        self._stopped = False
        self._filling = False
        self._done = asyncio.Event()

    async def fill(self) -> None:
        """Populate the pool; returns when it is full, stopped or refused (logged)."""
        self._filling = True
        try:
            await self._fill()
        except Exception as exc:  # never fatal: the daemon serves without it
            log.error("warm pool not populated: %s", exc)
        finally:
            self._done.set()

    async def _fill(self) -> None:
        sink = self.sink
        # Within [memory] recycle too: a pool over it would be dropped by the first release.
        size = min(self.size, sink.available(), sink.recycle_budget)
        if self._stopped or self.size <= 0:  # none asked for, or a load came first
            return
        if size < self.size and size == sink.recycle_budget:
            log.warning(
                "warm pool of %d bytes, not the %d of [limits] warm_bytes: it is kept as a "
                "recycled arena, within [memory] recycle; raise that to keep more", size,
                self.size,
            )  # fmt: skip
        if size <= 0:
            log.warning("no warm pool: no shared memory left for [limits] warm_bytes")
            return
        freed = sink.new_freed(size)
        sink.warming = freed
        try:
            reservation = sink.reservation(freed.path, freed.mapping, 0, size, "a warm pool")
        except BaseException:
            sink.warming = None
            freed.drop()
            raise
        reservation.pace = env.warm_pace()
        self._reservation = reservation
        try:
            await reservation.run()
        except ResourceExhausted as exc:
            log.warning("warm pool of %d bytes not populated: %s", size, exc)
        finally:
            # Stopped, cancelled or full: what is reserved is kept for the next load (the
            # sink drops it at exit), what is not is reserved by the load that takes it.
            freed.reserved = reservation.reserved
            sink.warming = None
            if freed.reserved:
                sink.keep(freed)
            else:
                freed.drop()
        log.info("warm pool: %d of %d bytes populated", freed.reserved, size)

    def stop(self) -> None:
        """Stop populating after the region in progress (shutdown; does not wait)."""
        self._stopped = True
        if self._reservation is not None:
            self._reservation.stop()

    async def settle(self) -> None:
        """Stop populating and wait until the pool is in the sink's free list: a load is
        about to allocate, and would otherwise make a fresh arena beside it."""
        self.stop()
        if self._filling:  # (a sink whose pool is never filled has none to wait for)
            await self._done.wait()
