"""Models that outlive the daemon: seal a ready arena, adopt it at the next start.

When a CPU model becomes ready, ``seal`` writes a manifest beside its arena (its key, the
listing the key came from, its tensor table). At start the sink claims the sealed arenas
of the dead daemon that served the same socket (``sinks/adopt_shm.py``); before the gRPC
server answers anyone, ``adopt_claimed`` checks each against its source, with one listing
and no data GET, and registers it as resident. An arena whose source changed, or that the
allowlist no longer allows, is removed, as is anything unsealed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tensorferry.daemon.config.settings import Settings
from tensorferry.daemon.cpu_load import Loaded
from tensorferry.daemon.devices import CPU
from tensorferry.daemon.fetch.scheduler import FetchStats
from tensorferry.daemon.identity import weights_id, weights_version
from tensorferry.daemon.model import Model
from tensorferry.daemon.planner import Plan
from tensorferry.daemon.sinks.adopt_shm import Claimed, close_claimed
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink, ShmArena
from tensorferry.daemon.sinks.sealed import SealedArena
from tensorferry.daemon.source import check_allowed, is_weight_object, list_source, parse_uri
from tensorferry.errors import TensorferryError

if TYPE_CHECKING:  # the loader seals through this module
    from tensorferry.daemon.loader import Loader, Target
    from tensorferry.daemon.registry import Registry

log = logging.getLogger(__name__)
#: For listing every adopted model's source at start: the daemon serves no one meanwhile.
ADOPT_LISTING_TIMEOUT = 30.0
#: Adopted models are not evicted to make room for this long: workers of the daemon before
#: may map them and are re-establishing their leases.
ADOPT_GRACE = 60.0
#: Listings at once while adopting (each is one LIST request).
ADOPT_CONCURRENCY = 8


def seal_ready(
    sink: CpuShmSink, settings: Settings, target: Target, models: Sequence[Model],
    loaded: Sequence[Loaded], names: tuple[str, ...],
) -> None:  # fmt: skip
    """Seal the CPU arenas of a load whose last byte has landed (``[memory] adopt``)."""
    if not settings.adopt_arenas:
        return
    objects = tuple((o.key, o.etag, o.size) for o in target.listing)
    for model, result in zip(models, loaded, strict=True):
        if not isinstance(result.arena, ShmArena):
            continue  # GPU arenas die with the process until they are VMM exports
        key = model.key
        # (The sink logs what fails and goes on: a load whose bytes all landed stays ready.)
        sink.seal(
            result.arena,
            SealedArena(
                socket=str(settings.socket), uri=model.uri, weights=key.weights,
                version=key.version, device=key.device, select=key.select, rank=key.rank,
                world_size=key.world_size, objects=objects, tensors=result.plan.tensors,
                names=names if key.select else (), size=result.arena.size,
                sealed_at=time.time(), pinned=model.pinned,
            ),
        )  # fmt: skip


def _weight_objects(objects: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return sorted(o for o in objects if is_weight_object(o[0]))


class Unverified(Exception):
    """The source could not be listed: the arena is neither served nor removed."""


async def _check(loader: Loader, settings: Settings, manifest: SealedArena) -> str:
    """Why the arena may not be adopted, or "" when its source still has that version;
    ``Unverified`` when that cannot be known now."""
    if manifest.device != CPU:
        return f"it was sealed for {manifest.device}"
    try:
        ref = parse_uri(manifest.uri)
        check_allowed(ref, settings)
    except TensorferryError as exc:
        return f"its source is not allowed any more ({exc})"
    try:
        store = loader.open(ref)
        listing = await list_source(ref, store)
    except Exception as exc:  # any failure: a daemon that cannot start would loop on it
        raise Unverified(f"its source could not be listed ({exc})") from exc
    if (weights_id(store.uri, listing), weights_version(listing)) != (
        manifest.weights,
        manifest.version,
    ):
        return "its source changed while the daemon was down (another version is there now)"
    now = [(o.key, o.etag, o.size) for o in listing]
    if _weight_objects(now) != _weight_objects(manifest.objects):
        return "its source changed while the daemon was down (another version is there now)"
    return ""


async def adopt_claimed(loader: Loader, registry: Registry, settings: Settings) -> list[Model]:
    """Check each arena the sink claimed against its source; adopt the unchanged ones and
    remove the rest. Done before the server answers: a request never refetches a model
    that is about to be adopted."""
    sink = registry.sink
    claimed = sink.claimed
    try:
        return await _adopt_all(loader, registry, settings, claimed)
    finally:
        close_claimed(claimed)  # any left (an error, a cancel): sealed still, for next time


async def _adopt_all(
    loader: Loader, registry: Registry, settings: Settings, claimed: list[Claimed]
) -> list[Model]:
    sink = registry.sink
    verdicts: dict[int, str] = {}
    gate = asyncio.Semaphore(ADOPT_CONCURRENCY)

    async def check(i: int, c: Claimed) -> None:
        async with gate:
            try:
                verdicts[i] = await _check(loader, settings, c.manifest)
            except Unverified as exc:
                log.warning(
                    "not adopting %s (%s) now: %s; it stays sealed for the daemon's next "
                    "start, and a load of it now fetches it again", c.path.name,
                    c.manifest.uri, exc,
                )  # fmt: skip

    try:
        async with asyncio.timeout(ADOPT_LISTING_TIMEOUT), asyncio.TaskGroup() as tasks:
            for i, c in enumerate(claimed):
                tasks.create_task(check(i, c))
    except TimeoutError:
        log.warning(
            "listing the sources of sealed arenas took over %.0f s: those not listed by then "
            "stay sealed for the daemon's next start", ADOPT_LISTING_TIMEOUT,
        )  # fmt: skip
    adopted: list[Model] = []
    for i, c in enumerate(claimed):
        why = verdicts.get(i)
        if why is None:
            continue  # unverified: closed below, its files left as they are
        if not why and registry.find(c.manifest.key) is not None:
            why = "another arena of the same model was adopted"
        if why:
            sink.discard(c, why)
            continue
        try:
            adopted.append(_adopt(sink, registry, c, loader))
        except OSError as exc:  # the segment's group or mode could not be set, or no mmap
            sink.discard(c, f"its segment could not be mapped ({exc})")
    if sink.budget and sink.used > sink.budget:
        log.warning(
            "the adopted arenas hold %d bytes, over [memory] shm_budget (%d): new loads "
            "evict unleased models first", sink.used, sink.budget,
        )  # fmt: skip
    if adopted:
        total = sum(m.loaded.arena.size for m in adopted if m.loaded is not None)
        log.info(
            "adopted %d models (%d bytes) from the daemon before: resident, nothing fetched",
            len(adopted), total,
        )  # fmt: skip
    return adopted


def _adopt(sink: CpuShmSink, registry: Registry, claimed: Claimed, loader: Loader) -> Model:
    manifest = claimed.manifest
    arena = sink.adopt(claimed)
    plan = Plan(tensors=manifest.tensors, ranges=(), arena_size=manifest.size)
    now = time.monotonic()
    loaded = Loaded(plan, arena, FetchStats(started=now, finished=now), arena_ready=now)
    if manifest.names:
        loader.names.remember((manifest.weights, manifest.version), manifest.names)
    elif not manifest.select and not manifest.world_size:
        # Everything was selected: the plan's tensors are the source's names.
        loader.names.remember(
            (manifest.weights, manifest.version), (t.name for t in manifest.tensors)
        )
    model = registry.adopt(manifest.key, manifest.uri, loaded)
    model.adopted, model.pinned = True, manifest.pinned
    # A worker of the daemon before may still map the arena: never recycle it, and leave
    # those workers time to re-establish their leases before it may go to make room.
    model.released_early = True
    model.hold_until = time.monotonic() + ADOPT_GRACE
    log.info("adopted %s as %s (%d bytes, sealed %.0f s ago)", manifest.uri, model.id,
             arena.size, max(time.time() - manifest.sealed_at, 0.0))  # fmt: skip
    return model
