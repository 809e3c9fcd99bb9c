"""Load orchestration: what a request names, and the cold load of a model.

The service asks ``target`` what a request names: its source listed, the key of the
resident model it maps to. When no model has that key, the registry runs the target's cold
load through ``load``: plan (plain safetensors or a prepared artifact), then placement on
the model's devices, recorded in ``recent``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tensorferry.daemon.adoption import seal_ready
from tensorferry.daemon.arrivals import Arrivals
from tensorferry.daemon.config.settings import Settings
from tensorferry.daemon.cpu_load import Loaded, OnLanded
from tensorferry.daemon.fetch.link import link_rate
from tensorferry.daemon.fetch.retries import FetchPolicy
from tensorferry.daemon.identity import TensorNames, weights_id, weights_version
from tensorferry.daemon.listings import RecentListings
from tensorferry.daemon.model import Model, ModelKey, State
from tensorferry.daemon.placement import place_plan
from tensorferry.daemon.planner import Plan, plan_load
from tensorferry.daemon.planner_prepared import (
    check_unsharded,
    is_prepared,
    plan_manifest,
    read_manifest,
)
from tensorferry.daemon.records import LoadRecord, RecentLoads
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.daemon.source import Source, SourceRef, list_source, read_source
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.store.cache import DiskTier
from tensorferry.daemon.store.factory import open_store
from tensorferry.errors import TensorferryError
from tensorferry.format.manifest import Manifest

if TYPE_CHECKING:
    from tensorferry.daemon.gpu.runtime import CudaRuntime
    from tensorferry.daemon.store.s3 import S3Backend

log = logging.getLogger(__name__)
#: A prepared artifact's manifest and the store's object for each of its data objects.
Prepared = tuple[Manifest, tuple[ObjectInfo, ...]]


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A request resolved against its source: the model it names and how to load it."""

    ref: SourceRef
    store: Store
    listing: list[ObjectInfo]
    key: ModelKey
    #: More devices filled by the same fetch (a preload onto several GPUs).
    fan_out: tuple[ModelKey, ...]
    #: The selection as asked (the key holds the tensor set it resolves to).
    select: tuple[str, ...]
    #: Headers or manifest read while keying the selection: the cold load reuses them.
    source: Source | Prepared | None
    #: When the request arrived: every timing of its load record counts from here.
    t0: float
    #: When the key was known (the listing done or reused): an attach's record shows it.
    keyed: float
    #: Every tensor name of the source when known at keying time (a sealed arena keeps
    #: them: an adopted selection is keyed again with no header read).
    names: tuple[str, ...] = ()


class Loader:
    def __init__(
        self, settings: Settings, cpu: CpuShmSink, cuda: CudaRuntime | None,
        backend: S3Backend | None, tier: DiskTier | None, recent: RecentLoads,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.cpu = cpu
        self.cuda = cuda
        self.backend = backend
        self.tier = tier
        self.recent = recent
        #: Tensor names of recently read sources: selections are keyed by what they pick.
        self.names = TensorNames()
        self.listings = RecentListings(settings.listing_reuse)
        s3 = settings.s3
        #: What loads size their GETs in flight for.
        self.link = link_rate(s3.target_rate)
        self.policy = FetchPolicy(
            attempts=s3.attempts,
            budget=s3.retry_budget,
            range_deadline=s3.range_deadline,
            max_concurrency=s3.max_concurrency,
            target_rate=s3.target_rate,
            link_rate=self.link.bps,
            hedge=s3.hedge,
        )

    def open(self, ref: SourceRef) -> Store:
        return open_store(ref, self.backend, self.tier)

    async def target(
        self, ref: SourceRef, devices: list[str], select: tuple[str, ...], rank: int,
        world_size: int, t0: float, find: Callable[[ModelKey], Model | None] = lambda _: None,
    ) -> Target:  # fmt: skip
        """What the request names. A listing of ``ref`` begun at most ``[sources]
        listing_reuse`` seconds before ``t0`` stands in for a new one when every model it
        names is ready (``find``: the registry's), so only an attach reuses one."""
        store = self.open(ref)
        args = (ref, store, devices, select, rank, world_size, t0)
        listing = self.listings.get(ref, t0)
        if listing is not None and (not select or self.names.known(self._weights(store, listing))):
            target = await self._resolve(listing, *args)
            models = [find(k) for k in (target.key, *target.fan_out)]
            if all(m is not None and m.state is State.READY for m in models):
                return target
        began = time.monotonic()
        listing = await list_source(ref, store)
        self.listings.put(ref, began, listing)
        return await self._resolve(listing, *args)

    @staticmethod
    def _weights(store: Store, listing: list[ObjectInfo]) -> tuple[str, str]:
        return weights_id(store.uri, listing), weights_version(listing)

    async def _resolve(
        self, listing: list[ObjectInfo], ref: SourceRef, store: Store, devices: list[str],
        select: tuple[str, ...], rank: int, world_size: int, t0: float,
    ) -> Target:  # fmt: skip
        weights = self._weights(store, listing)
        source: Source | Prepared | None = None
        if select and not self.names.known(weights):
            # The selection is keyed by the tensors it picks: read the names now (the cold
            # load that follows uses this read).
            if is_prepared(listing):
                source = await self._read_manifest(store, listing)
            else:
                source = await self._read_source(ref, store, listing)
        key = ModelKey(
            *weights, devices[0], self.names.selection_key(weights, select), rank=rank,
            world_size=world_size,
        )  # fmt: skip
        fan_out = tuple(dataclasses.replace(key, device=d) for d in devices[1:])
        return Target(
            ref, store, listing, key, fan_out, select, source, t0, time.monotonic(),
            self.names.get(weights),
        )  # fmt: skip

    async def weights_of(self, ref: SourceRef) -> str:
        """The weights id of a source, or "" when it cannot be listed (for Evict)."""
        try:
            store = self.open(ref)
            return weights_id(store.uri, await list_source(ref, store))
        except (TensorferryError, OSError):
            # Not listable: no resident model can be its, and Evict says so (NOT_FOUND),
            # never INTERNAL with the reason.
            return ""

    async def _read_source(self, ref: SourceRef, store: Store, listing: list[ObjectInfo]) -> Source:
        limit = self.settings.limits.max_tensors
        source = await read_source(ref, store, listing, max_tensors=limit, policy=self.policy)
        weights = (weights_id(store.uri, listing), weights_version(listing))
        self.names.remember(weights, source.names())
        return source

    async def _read_manifest(self, store: Store, listing: list[ObjectInfo]) -> Prepared:
        prepared = await read_manifest(store, listing, self.policy)
        weights = (weights_id(store.uri, listing), weights_version(listing))
        self.names.remember(weights, (t.name for t in prepared[0].tensors))
        return prepared

    async def _plan(self, target: Target) -> Plan:
        key, source, chunk = target.key, target.source, self.settings.s3.chunk_size
        if is_prepared(target.listing):
            if not isinstance(source, tuple):
                source = await self._read_manifest(target.store, target.listing)
            return await plan_manifest(
                *source, target.ref.uri, chunk_size=chunk, select=target.select,
                rank=key.rank, world_size=key.world_size,
            )  # fmt: skip
        check_unsharded(target.ref.uri, key.world_size, key.device)
        if not isinstance(source, Source):
            source = await self._read_source(target.ref, target.store, target.listing)
        return await plan_load(source, chunk, target.select)

    async def load(self, target: Target, model: Model) -> tuple[Loaded, ...]:
        """The cold load of ``model`` and its fan-out models (one fetch for all): one
        result per model, ``model``'s first."""
        uri, t0 = target.ref.uri, target.t0
        plan_done = 0.0

        def on_plan(plan: Plan) -> None:
            nonlocal plan_done
            plan_done = time.monotonic()
            model.bytes_total = plan.fetch_bytes

        def progress(n: int) -> None:
            model.bytes_done += n

        def on_arena(arena: ShmArena) -> OnLanded:
            model.arrivals = Arrivals(plan, arena.grant())
            return model.arrivals.landed

        try:
            plan = await self._plan(target)
            devices = [model.key.device, *(m.key.device for m in model.fan_out)]
            loaded = await place_plan(
                target.store, plan, uri, devices, self.cpu, self.cuda,
                concurrency=self.settings.s3.concurrency, policy=self.policy,
                max_model_bytes=self.settings.limits.max_model_bytes, on_plan=on_plan,
                progress=progress, on_arena=on_arena,
            )  # fmt: skip
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            self.recent.append(LoadRecord(uri, outcome, error=str(exc)))
            raise
        finally:
            if model.arrivals is not None:
                model.arrivals.finish()
        names = target.names or self.names.get((model.key.weights, model.key.version))
        seal_ready(self.cpu, self.settings, target, [model, *model.fan_out], loaded, names)
        st, end = loaded[0].stats, time.monotonic()
        self.recent.append(
            LoadRecord(
                uri, "ready", plan_done - t0, (st.first_byte or end) - t0,
                st.finished - st.started, end - t0, st.bytes,
                retries=st.retries + plan.read_retries.total(),
                retry_causes=tuple(sorted((st.causes + plan.read_retries).items())),
                hedges=st.hedges, workers=st.workers,
                arena_seconds=(loaded[0].arena_ready or plan_done) - t0,
            )
        )  # fmt: skip
        log.info(
            "loaded %s: %d bytes in %.2f s (%.2f GB/s)", uri, st.bytes, end - t0,
            st.bytes / max(end - t0, 1e-9) / 1e9,
        )  # fmt: skip
        return loaded
