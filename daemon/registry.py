"""Resident models and their leases.

Models (``daemon.model``) are keyed by what they hold. Concurrent loads of one key share
one fetch; a lease is held by an open Load stream; an arena is freed only when its model is
evicted and no lease holds it. Evicting a model that is still loading cancels its fetch,
and its waiters fail with ``ModelEvicted``. A preload onto several GPUs starts one load
for all of them: the others (its ``fan_out``) become ready, or fail, with the first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tensorferry.daemon.cpu_load import Loaded
from tensorferry.daemon.devices import CPU
from tensorferry.daemon.model import Eviction, Model, ModelKey, State
from tensorferry.daemon.sinks import Sinks
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.errors import FailedPrecondition, ModelNotFound, ResourceExhausted, quote

if TYPE_CHECKING:
    from tensorferry.cuda import DeviceInfo
    from tensorferry.daemon.gpu.runtime import CudaRuntime

log = logging.getLogger(__name__)


class ColdLoader(Protocol):
    """What runs a model's load (daemon.loader.Loader): the registry only decides when."""

    async def load(self, job: Any, model: Model) -> tuple[Loaded, ...]: ...


class Registry:
    def __init__(
        self, sink: CpuShmSink, tasks: asyncio.TaskGroup, loader: ColdLoader,
        max_loads: int = 0, max_per_client: int = 0, cuda: CudaRuntime | None = None,
    ) -> None:  # fmt: skip
        self.sink = sink
        self.sinks = Sinks(sink, None if cuda is None else cuda.sink)
        self._loader = loader
        sink.reclaim = self.reclaim
        #: The daemon's CUDA side; None without a GPU (CPU loads only).
        self.cuda = cuda
        if cuda is not None:
            cuda.sink.reclaim = self.reclaim
        self.max_loads = max_loads
        self.max_per_client = max_per_client
        self._tasks = tasks
        self._by_key: dict[ModelKey, Model] = {}
        self._all: dict[str, Model] = {}
        self._seq = itertools.count(1)
        self._loads: set[asyncio.Task[None]] = set()

    @property
    def models(self) -> list[Model]:
        return list(self._all.values())

    @property
    def gpus(self) -> list[DeviceInfo] | None:
        return None if self.cuda is None else self.cuda.devices

    def find(self, key: ModelKey) -> Model | None:
        return self._by_key.get(key)

    def get_or_start(
        self, key: ModelKey, uri: str, job: Any, client: str = "",
        fan_out: Sequence[ModelKey] = (),
    ) -> tuple[Model, bool]:  # fmt: skip
        """The model for ``key`` and whether it was already there (loading or ready).

        A new model's load (the loader's ``load(job, model)``) runs in the registry's task
        group, not in the caller's task: it outlives a caller that disconnects while others
        (or a preload) wait for it.
        ``fan_out``: more devices that get the same bytes from one fetch (a preload onto
        several GPUs); those not resident or loading join the load started here.
        """
        missing = [k for k in fan_out if k not in self._by_key]
        if (model := self._by_key.get(key)) is not None:
            model.last_used = time.monotonic()
            model.aliases.add(uri)
            if missing:
                self._start(missing[0], uri, job, client, missing[1:]).keep = True
            return model, True
        if self.max_loads and len(self._loads) >= self.max_loads:
            raise ResourceExhausted(
                f"{len(self._loads)} loads are already fetching, the daemon's limit "
                f"([limits] max_concurrent_loads = {self.max_loads}); retry when one finishes"
            )
        mine = sum(1 for m in self._all.values() if m.state is State.LOADING and m.client == client)
        if self.max_per_client and mine >= self.max_per_client:
            raise ResourceExhausted(
                f"client {client!r} already has {mine} loads fetching, the daemon's limit per "
                f"client ([limits] max_loads_per_client = {self.max_per_client}); retry when "
                "one finishes"
            )
        return self._start(key, uri, job, client, missing), False

    def _new(self, key: ModelKey, uri: str, client: str) -> Model:
        model = Model(
            id=f"m{next(self._seq)}-{key.version[:8]}", key=key, uri=uri, client=client,
            aliases={uri},
        )  # fmt: skip
        self._by_key[key] = model
        self._all[model.id] = model
        return model

    def _start(
        self, key: ModelKey, uri: str, job: Any, client: str, fan_out: Sequence[ModelKey]
    ) -> Model:
        model = self._new(key, uri, client)
        for k in fan_out:
            follower = self._new(k, uri, client)
            follower.keep = True  # fan-out is for preloads: nobody waits on it to cancel
            model.fan_out.append(follower)
        task = self._tasks.create_task(self._run(model, job))
        model.task = task
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        task.add_done_callback(lambda t: self._settle(model, t))
        return model

    async def _run(self, model: Model, job: Any) -> None:
        group = [model, *model.fan_out]
        try:
            loaded = await self._loader.load(job, model)
        except BaseException as exc:
            for m in group:
                self._fail(m, exc, model.evicted_by)
            if not isinstance(exc, Exception):
                raise
            return
        for m, result in zip(group, loaded, strict=True):
            m.loaded = result
            if m.state is State.LOADING:
                m.state = State.READY
            m.done.set_result(m.loaded)
            self._maybe_free(m)  # evicted while it was loading

    def _settle(self, model: Model, task: asyncio.Task[None]) -> None:
        """A load cancelled before its first step never entered ``_run`` (a coroutine
        cancelled before it starts skips its handlers): fail its group here, or it would
        stay loading for ever with its waiters waiting."""
        if task.cancelled():
            for m in (model, *model.fan_out):
                if not m.done.done():
                    self._fail(m, asyncio.CancelledError(), model.evicted_by)

    def _fail(self, model: Model, exc: BaseException, evicted_by: str = "") -> None:
        self._forget(model)
        if model.done.done():
            return
        if isinstance(exc, asyncio.CancelledError) and evicted_by:
            model.evicted_by = evicted_by
            model.done.set_exception(model.evicted_error())
            model.done.exception()  # waiters may all be gone; mark it retrieved
        elif isinstance(exc, asyncio.CancelledError):
            model.done.cancel()
        else:
            model.done.set_exception(exc)
            model.done.exception()  # waiters may all be gone; mark it retrieved

    def leave(self, model: Model) -> None:
        """A request stopped waiting; stop the fetch if it was the last one (not preload)."""
        model.waiters -= 1
        idle = model.waiters == 0 and not model.keep and model.state is State.LOADING
        if idle and model.task is not None and not model.task.done():
            log.info("no one waits for %s any more: stopping its fetch", model.uri)
            self._forget(model)  # a request arriving now starts a fresh load
            model.task.cancel()

    def _forget(self, model: Model) -> None:
        if self._by_key.get(model.key) is model:
            del self._by_key[model.key]
        self._all.pop(model.id, None)

    def adopt(self, key: ModelKey, uri: str, loaded: Loaded) -> Model:
        """A ready model with no load: an arena adopted at start (``daemon.adoption``)."""
        model = self._new(key, uri, "adopted")
        model.loaded, model.state = loaded, State.READY
        model.done.set_result(loaded)
        return model

    def pin(self, model: Model) -> None:
        """Never evicted to make room, also once adopted after a restart (its manifest)."""
        if not model.pinned:
            model.pinned = True
            if model.loaded is not None and isinstance(model.loaded.arena, ShmArena):
                self.sink.pin(model.loaded.arena)

    def add_lease(self, model: Model, client: str) -> str:
        lease = secrets.token_hex(8)
        model.leases[lease] = client
        model.last_used = time.monotonic()
        return lease

    def drop_lease(self, model: Model, lease: str) -> None:
        if model.leases.pop(lease, None) is not None:
            self._maybe_free(model)

    def end_early(self, lease: str) -> None:
        """Release ends ``lease`` while its worker may still hold views.

        CPU arenas allow it: their pages are never reused (``released_early``), and a
        worker's mapping keeps them. A GPU arena does not: cudaFree of memory another
        process still maps through IPC is undefined, and only the lease's stream (which
        the worker ends after closing its mapping) proves the mapping gone, so Release is
        refused for GPU leases.
        """
        model = self.find_lease(lease)
        if model is None:
            return
        if model.key.device != CPU:
            raise FailedPrecondition(
                f"lease {quote(lease, bare=True)} holds a GPU arena ({model.key.device}): it "
                "cannot be released while the worker may still map it; it ends when that "
                "worker drops the model's tensors (LoadedModel.close and its last view) or exits"
            )
        model.released_early = True

    def find_lease(self, lease: str) -> Model | None:
        for model in self._all.values():
            if lease in model.leases:
                return model
        return None

    def named(self, what: str) -> bool:
        return any(m.named(what) for m in self._all.values())

    def evict(self, what: str, by: str = "", weights: str = "") -> Eviction:
        """Evict models by id or (normalised) URI, or all models of ``weights``.

        A model still loading stops fetching, and the requests waiting for it fail with
        ModelEvicted naming ``by``; a ready one is freed when its last lease ends.
        """
        matches = [m for m in self._all.values() if m.named(what) or m.key.weights == weights]
        if not matches:
            raise ModelNotFound(
                f"no resident model {what!r}; `tensorferry ls` lists model ids and URIs"
            )
        pending = refused = 0
        for model in matches:
            if self._by_key.get(model.key) is model:
                del self._by_key[model.key]  # new loads of this URI fetch afresh
            # Waiters wake to an evicted model and are refused (service._events).
            refused += model.waiters
            model.evicted_by = by
            if model.state is State.LOADING and model.task is not None:
                if not model.task.done():
                    model.task.cancel()  # _run fails the group with ModelEvicted
                continue
            model.state = State.EVICTING
            if model.loaded is not None and isinstance(model.loaded.arena, ShmArena):
                self.sink.unseal(model.loaded.arena)  # a crash now must not bring it back
            pending += len(model.leases)
            self._maybe_free(model)
        return Eviction([m.id for m in matches], pending, refused)

    def reclaim(self, needed: int, device: str = "cpu") -> None:
        """Evict ready models on ``device`` that nobody holds, least recently used first,
        to free ``needed`` bytes there."""
        now = time.monotonic()
        idle = sorted(
            (m for m in self._all.values()
             if m.state is State.READY and not m.leases and not m.pinned and m.loaded
             and m.key.device == device and m.hold_until <= now),
            key=lambda m: m.last_used,
        )  # fmt: skip
        freed = 0
        for model in idle:
            if freed >= needed:
                break
            assert model.loaded is not None
            freed += model.loaded.arena.size
            log.info("evicting %s (least recently used) to make room", model.uri)
            self.evict(model.id, "the daemon, to make room")

    def _maybe_free(self, model: Model) -> None:
        if model.state is State.EVICTING and not model.leases and model.loaded is not None:
            self._release(model, recycle=not model.released_early)
            self._all.pop(model.id, None)
            log.info("freed model %s (%s)", model.id, model.uri)

    def _release(self, model: Model, *, recycle: bool) -> None:
        # A GPU arena: every importer closed its mapping before its lease ended (the
        # client's order), and no lease on it ends by Release (``end_early``), so no
        # worker maps the memory cudaFree returns.
        assert model.loaded is not None
        self.sinks.for_device(model.key.device).release(model.loaded.arena, recycle=recycle)

    def cancel_loads(self) -> None:
        for task in self._loads:
            task.cancel()

    def close(self, keep: bool = False) -> None:
        """Release every arena but, with ``keep``, the sealed ones of ready CPU models."""
        for model in list(self._all.values()):
            if model.loaded is None:
                continue
            arena = model.loaded.arena
            if keep and model.state is State.READY and isinstance(arena, ShmArena) and arena.sealed:
                log.info("leaving %s sealed for the next daemon: %s", model.uri, arena.path)
                self.sink.leave(arena)
            else:
                self._release(model, recycle=False)
        self._all.clear()
        self._by_key.clear()
