"""The gRPC service: requests in, events and status codes out.

Errors leave every handler through ``_abort``, which uses the one mapping in
``tensorferry.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from tensorferry import __version__
from tensorferry._peer import LEASE_END_KEY
from tensorferry.daemon.config import Limits, Settings
from tensorferry.daemon.devices import resolve_devices
from tensorferry.daemon.fetch import RetryPolicy
from tensorferry.daemon.identity import TensorNames, weights_id, weights_version
from tensorferry.daemon.manifest import Manifest
from tensorferry.daemon.peers import Peer, Peers
from tensorferry.daemon.pipeline import Loaded
from tensorferry.daemon.placement import grant, place_plan
from tensorferry.daemon.planner import make_plan
from tensorferry.daemon.prepared import check_unsharded, is_prepared, plan_prepared, read_manifest
from tensorferry.daemon.registry import LoadRecord, Model, ModelKey, Registry, State
from tensorferry.daemon.requests import check_rank, check_select, extra_files
from tensorferry.daemon.sinks.cpu_shm import mem_available
from tensorferry.daemon.source import (
    Source,
    SourceRef,
    check_allowed,
    list_source,
    parse_uri,
    read_source,
)
from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.store.cache import CachingStore, DiskTier
from tensorferry.daemon.store.local import LocalStore
from tensorferry.daemon.store.s3 import S3Backend, S3Store
from tensorferry.errors import (
    DaemonUnavailable,
    InvalidRequest,
    LeaseNotOwned,
    ResourceExhausted,
    SourceNotFound,
    TensorferryError,
    to_status,
)
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
TENSORS_PER_MESSAGE = 2000  # ~200 KB per message, far below gRPC's 4 MiB default
PROGRESS_INTERVAL = 0.1
FILE_CHUNK = 1 << 20
MAX_FILE_BYTES = 256 << 20
WRITE_FAILED_GRACE = 2.0
T = TypeVar("T")
#: A prepared artifact's manifest and the store's object for each of its data objects.
Prepared = tuple[Manifest, tuple[ObjectInfo, ...]]


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: BaseException,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    code, details, trailers = to_status(exc)
    if not isinstance(exc, TensorferryError):
        log.exception("internal error", exc_info=exc)
    context.set_trailing_metadata(trailers + extra)
    await context.abort(code, details)


class CallKind(enum.Enum):
    """Admission classes, each with its own [limits] key: leases can fill theirs without
    locking operators out."""

    LEASE = "max_leases"
    TRANSFER = "max_transfer_calls"
    CONTROL = "max_control_calls"

    def limit(self, limits: Limits) -> int:
        return int(getattr(limits, self.value))

    def refusal(self, n: int, limit: int) -> str:
        key = f"([limits] {self.value} = {limit})"
        if self is CallKind.LEASE:
            return (
                f"{n} leases are open on this daemon, its limit {key}; each loaded model "
                "holds one until it is closed or released: release unused models or raise "
                "the limit"
            )
        if self is CallKind.TRANSFER:
            return (
                f"{n} Preload and GetFile calls are open on this daemon, its limit {key}; "
                "retry when one ends or raise the limit"
            )
        return (
            f"{n} control calls (Status, List, Release, Evict) are open on this daemon, its "
            f"limit {key}; retry in a moment or raise the limit"
        )


async def _write(context: grpc.aio.ServicerContext[Any, Any], message: Any) -> None:
    """Send one message of a stream; a client that went away is a cancellation, not an error."""
    try:
        await context.write(message)
    except Exception:
        # A write fails when the call ended under it (the client cancelled, or its deadline
        # passed), and gRPC cancels this handler a moment later: wait for that, so a client
        # that went away ends as the cancellation it is, not as an ERROR in the log.
        await asyncio.sleep(WRITE_FAILED_GRACE)
        raise


def unary(
    fn: Callable[[LoaderService, Any, Any], Awaitable[T]],
) -> Callable[[LoaderService, Any, Any], Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: LoaderService, request: Any, context: Any) -> T:
        try:
            with self.admitted(CallKind.CONTROL):
                return await fn(self, request, context)
        except Exception as exc:
            await _abort(context, exc)
            raise  # not reached: abort raises

    return wrapper


class LoaderService(pb_grpc.LoaderServicer):
    def __init__(
        self, settings: Settings, registry: Registry, backend: S3Backend, instance: str
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.backend = backend
        self.instance = instance
        self.started = time.monotonic()
        #: The local disk tier, when [cache] dir is configured (set by the server).
        self.tier: DiskTier | None = None
        #: Tensor names of recently read sources: selections are keyed by what they pick.
        self.names = TensorNames()
        s3 = settings.s3
        self.policy = RetryPolicy(
            attempts=s3.attempts, budget=s3.retry_budget, range_deadline=s3.range_deadline
        )
        self._released: dict[str, asyncio.Event] = {}
        #: Who took each open lease (None: a caller that sent no peer token).
        self._owners: dict[str, Peer | None] = {}
        #: Who calls: set by the server once the peer socket listens.
        self.peers: Peers | None = None
        self.stopping = asyncio.Event()
        self.open_calls = dict.fromkeys(CallKind, 0)
        self.draining = asyncio.Event()

    def _store(self, ref: SourceRef) -> Store:
        store: Store
        if ref.scheme == "s3":
            store = S3Store(self.backend, ref.bucket, ref.prefix, ref.single)
        else:
            assert ref.path is not None
            store = LocalStore(ref.path, ref.uri.removesuffix(ref.single or ""), ref.single)
        return store if self.tier is None else CachingStore(store, self.tier)

    async def _read_source(self, ref: SourceRef, store: Store, listing: list[ObjectInfo]) -> Source:
        source = await read_source(
            ref, store, listing, max_tensors=self.settings.limits.max_tensors
        )
        weights = (weights_id(store.uri, listing), weights_version(listing))
        self.names.remember(weights, (t.name for _, header in source.files for t in header.tensors))
        return source

    async def _read_manifest(self, store: Store, listing: list[ObjectInfo]) -> Prepared:
        prepared = await read_manifest(store, listing)
        weights = (weights_id(store.uri, listing), weights_version(listing))
        self.names.remember(weights, (t.name for t in prepared[0].tensors))
        return prepared

    async def _cold_load(
        self, store: Store, ref: SourceRef, listing: list[ObjectInfo], model: Model, t0: float,
        select: tuple[str, ...], source: Source | Prepared | None,
    ) -> Loaded:  # fmt: skip
        s3 = self.settings.s3
        plan_done = 0.0
        try:
            key = model.key
            if is_prepared(listing):
                if not isinstance(source, tuple):
                    source = await self._read_manifest(store, listing)
                plan = plan_prepared(
                    *source, ref.uri, chunk_size=s3.chunk_size, select=select, rank=key.rank,
                    world_size=key.world_size,
                )  # fmt: skip
            else:
                check_unsharded(ref.uri, key.world_size)
                if not isinstance(source, Source):
                    source = await self._read_source(ref, store, listing)
                plan = make_plan(source, s3.chunk_size, select)

            def on_plan(plan: Any) -> None:
                nonlocal plan_done
                plan_done = time.monotonic()
                model.bytes_total = plan.fetch_bytes

            def progress(n: int) -> None:
                model.bytes_done += n

            loaded = await place_plan(
                store, plan, ref.uri, model, self.registry,
                concurrency=s3.concurrency, policy=self.policy,
                max_model_bytes=self.settings.limits.max_model_bytes,
                on_plan=on_plan,
                progress=progress,
            )  # fmt: skip
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            self.registry.recent.append(LoadRecord(ref.uri, outcome, error=str(exc)))
            raise
        st, end = loaded.stats, time.monotonic()
        self.registry.recent.append(
            LoadRecord(
                ref.uri, "ready", plan_done - t0, (st.first_byte or end) - t0,
                st.finished - st.started, end - t0, st.bytes,
                retries=st.retries, retry_causes=tuple(sorted(st.causes.items())),
            )
        )  # fmt: skip
        log.info(
            "loaded %s: %d bytes in %.2f s (%.2f GB/s)", ref.uri, st.bytes, end - t0,
            st.bytes / max(end - t0, 1e-9) / 1e9,
        )  # fmt: skip
        return loaded

    async def _events(
        self, request: pb.LoadRequest | pb.PreloadRequest, client: str, lease: bool
    ) -> AsyncIterator[pb.LoadEvent]:
        t0 = time.monotonic()
        if self.draining.is_set():
            raise DaemonUnavailable(
                "the tensorferry daemon is shutting down and takes no new loads; retry when "
                "it is back"
            )
        ref = parse_uri(request.uri)
        devices = resolve_devices(
            request.device, request.gpu_uuids, self.registry.gpus, lease=lease
        )
        select = check_select(request.select)
        rank, world_size = check_rank(request.rank, request.world_size)
        check_allowed(ref, self.settings)
        yield pb.LoadEvent(progress=pb.Progress(stage="plan"))
        store = self._store(ref)
        listing = await list_source(ref, store)
        weights = (weights_id(store.uri, listing), weights_version(listing))
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
        # A preload onto several GPUs: one fetch fills them all (registry fan-out).
        fan_out = [dataclasses.replace(key, device=d) for d in devices[1:]]
        model, existed = self.registry.get_or_start(
            key, ref.uri, lambda m: self._cold_load(store, ref, listing, m, t0, select, source),
            client, fan_out,
        )  # fmt: skip
        if existed and model.state is State.READY:
            yield pb.LoadEvent(progress=pb.Progress(stage="attach"))
        group = [model, *(m for k in fan_out if (m := self.registry.find(k)) is not None)]
        sent = -1
        model.waiters += 1
        model.keep = model.keep or not lease  # a preload finishes even if its caller goes
        model.pinned = model.pinned or bool(getattr(request, "pin", False))
        try:
            while not all(m.done.done() for m in group):
                await asyncio.wait([m.done for m in group], timeout=PROGRESS_INTERVAL)
                if model.bytes_done != sent:
                    sent = model.bytes_done
                    yield pb.LoadEvent(
                        progress=pb.Progress(
                            stage="fetch", bytes_done=sent, bytes_total=model.bytes_total
                        )
                    )
        finally:
            self.registry.leave(model)
        if any(m.done.cancelled() for m in group):
            raise DaemonUnavailable(
                f"the load of {ref.uri} was cancelled (its requesters went away, or the "
                "daemon is stopping); load it again"
            )
        for other in group[1:]:
            other.done.result()  # a GPU that failed fails the preload
        loaded = model.done.result()
        if model.state is State.EVICTING:
            # Evicted between becoming ready and this request waking: its arena may be
            # gone already, so no lease on it.
            raise model.evicted_error()
        attached = existed and model.state is State.READY and sent < 0
        if attached:
            self.registry.recent.append(
                LoadRecord(ref.uri, "attached", total_seconds=time.monotonic() - t0)
            )
        lease_id = self.registry.add_lease(model, client) if lease else ""
        released = asyncio.Event()
        if lease:
            self._released[lease_id] = released
        try:
            tensors = [
                pb.TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape, offset=t.offset,
                              nbytes=t.nbytes)
                for t in loaded.plan.tensors
            ]  # fmt: skip
            for i in range(0, len(tensors), TENSORS_PER_MESSAGE):
                batch = pb.TensorBatch(tensors=tensors[i : i + TENSORS_PER_MESSAGE])
                yield pb.LoadEvent(tensors=batch)
            yield pb.LoadEvent(
                ready=pb.Ready(
                    model_id=model.id, lease_id=lease_id, **grant(loaded),
                    tensor_count=len(tensors), total_bytes=loaded.plan.tensor_bytes,
                    attached=attached, seconds=time.monotonic() - t0,
                    files=extra_files(listing),
                )
            )  # fmt: skip
            if lease:
                # The open stream is the lease: hold it until the client goes away, calls
                # Release, or the daemon stops.
                waits = [
                    asyncio.ensure_future(self.stopping.wait()),
                    asyncio.ensure_future(released.wait()),
                ]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                if not released.is_set():
                    # Not OK: the worker must tell this from a Release (see _stream).
                    raise DaemonUnavailable(
                        "the tensorferry daemon is shutting down: this lease has ended; load "
                        "the model again once the daemon is back"
                    )
        finally:
            if lease:
                self._released.pop(lease_id, None)
                self.registry.drop_lease(model, lease_id)

    def preload_events(self, uri: str) -> AsyncIterator[pb.LoadEvent]:
        return self._events(pb.PreloadRequest(uri=uri), "config preload", lease=False)

    async def _stream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], lease: bool
    ) -> AsyncIterator[pb.LoadEvent]:
        client = getattr(request, "client_name", "") or context.peer()
        lease_id = ""
        try:
            with self.admitted(CallKind.LEASE if lease else CallKind.TRANSFER):
                owner = self._caller(context) if lease else None
                async for event in self._events(request, client, lease):
                    if lease and event.WhichOneof("event") == "ready":
                        lease_id = event.ready.lease_id
                        self._owners[lease_id] = owner
                    yield event
            if lease_id:
                # A lease's stream ends normally only by Release (a stop raises, and a
                # client that goes away cancels it).
                context.set_trailing_metadata(((LEASE_END_KEY, "released"),))
        except Exception as exc:
            end = "shutdown" if self.stopping.is_set() else "error"
            await _abort(context, exc, ((LEASE_END_KEY, end),) if lease_id else ())
        finally:
            self._owners.pop(lease_id, None)

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Peer | None:
        return None if self.peers is None else self.peers.caller(context)

    @contextlib.contextmanager
    def admitted(self, kind: CallKind) -> Iterator[None]:
        """Count the call in its class; refuse it, with the numbers, above that class's limit.

        Every handler comes through here. (gRPC's own limit, set above the sum as a
        backstop, would refuse without the numbers and regardless of class.)
        """
        limit, n = kind.limit(self.settings.limits), self.open_calls[kind]
        if n >= limit:
            raise ResourceExhausted(kind.refusal(n, limit))
        self.open_calls[kind] += 1
        try:
            yield
        finally:
            self.open_calls[kind] -= 1

    # grpc.aio recognises streaming handlers by being async generator functions.
    async def Load(
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.LoadEvent]:
        async for event in self._stream(request, context, lease=True):
            yield event

    async def Preload(
        self, request: pb.PreloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.LoadEvent]:
        async for event in self._stream(request, context, lease=False):
            yield event

    @unary
    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        event = self._released.get(request.lease_id)
        if event is not None:
            owner, caller = self._owners.get(request.lease_id), self._caller(context)
            if owner is None or caller is None or caller.key != owner.key:
                # No exception for root: ending a lease is the holder's call; an operator
                # evicts the model (freed when the last lease ends) or stops the worker.
                unknown = "an unidentified process"
                raise LeaseNotOwned(
                    f"lease {request.lease_id} is held by {owner.label if owner else unknown}; "
                    f"this call comes from {caller.label if caller else unknown}: only the "
                    "process that holds a lease can release it (it ends when that process "
                    "closes the model or exits)"
                )
            model = self.registry.find_lease(request.lease_id)
            if model is not None:
                model.released_early = True
            event.set()
        return pb.ReleaseResponse(released=event is not None)

    # Written with context.write (gRPC's other streaming form): a write under a client that
    # has gone away fails inside the handler, where it can be told from an error.
    async def GetFile(
        self, request: pb.GetFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            with self.admitted(CallKind.TRANSFER):
                async for chunk in self._file_chunks(request):
                    await _write(context, chunk)
        except Exception as exc:
            await _abort(context, exc)

    async def _file_chunks(self, request: pb.GetFileRequest) -> AsyncIterator[pb.FileChunk]:
        ref = parse_uri(request.uri)
        check_allowed(ref, self.settings)
        store = self._store(ref)
        listing = await list_source(ref, store)
        obj = next((o for o in listing if o.key == request.name), None)
        if obj is None or request.name not in extra_files(listing):
            raise SourceNotFound(
                f"{ref.uri}: no file {request.name!r}; the files a source offers are listed "
                "in the ready event of Load"
            )
        if obj.size > MAX_FILE_BYTES:
            raise InvalidRequest(
                f"{store.describe(obj)} has {obj.size} bytes; GetFile serves files up to "
                f"{MAX_FILE_BYTES} bytes"
            )
        if obj.size == 0:
            yield pb.FileChunk(data=b"", offset=0, size=0)
        for offset in range(0, obj.size, FILE_CHUNK):
            data = await store.read(obj, offset, min(FILE_CHUNK, obj.size - offset))
            yield pb.FileChunk(data=data, offset=offset, size=obj.size)

    def _model_info(self, model: Model) -> pb.ModelInfo:
        loaded = model.loaded
        return pb.ModelInfo(
            model_id=model.id, uri=model.uri, device=model.key.device,
            version=model.key.version, state=model.state.value,
            bytes=loaded.arena.size if loaded else 0,
            tensor_count=len(loaded.plan.tensors) if loaded else 0,
            leases=len(model.leases), lease_clients=sorted(model.leases.values()),
            pinned=model.pinned, waiting=model.waiters,
        )  # fmt: skip

    @unary
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(models=[self._model_info(m) for m in self.registry.models])

    @unary
    async def Evict(self, request: pb.EvictRequest, context: Any) -> pb.EvictResponse:
        if not request.model:
            raise InvalidRequest("evict needs a model id or URI")
        what, weights = request.model, ""
        if "://" in what or what.startswith("/"):
            ref = parse_uri(what)  # as Load normalises it
            what = ref.uri
            if not self.registry.named(what):
                # Another spelling of a resident source (its directory, its only file).
                with contextlib.suppress(TensorferryError):
                    store = self._store(ref)
                    weights = weights_id(store.uri, await list_source(ref, store))
        who = request.client_name or "an Evict call"
        done = self.registry.evict(what, by=who, weights=weights)
        return pb.EvictResponse(
            evicted=done.ids, pending_leases=done.pending_leases,
            refused_waiters=done.refused_waiters,
        )  # fmt: skip

    @unary
    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        models = self.registry.models
        return pb.StatusResponse(
            version=__version__, instance_id=self.instance, pid=os.getpid(),
            uptime_seconds=time.monotonic() - self.started,
            models=[self._model_info(m) for m in models],
            recent_loads=[
                pb.LoadRecord(
                    uri=r.uri, outcome=r.outcome, plan_seconds=r.plan_seconds,
                    first_byte_seconds=r.first_byte_seconds, fetch_seconds=r.fetch_seconds,
                    total_seconds=r.total_seconds, bytes=r.bytes,
                    gbps=r.bytes / r.total_seconds / 1e9 if r.total_seconds else 0.0,
                    error=r.error, retries=r.retries, retry_causes=dict(r.retry_causes),
                )
                for r in self.registry.recent
            ],
            resident_bytes=self.registry.sink.used,
            recycled_bytes=self.registry.sink.recycled_bytes,
            shm_budget_bytes=self.registry.sink.budget or (
                mem_available() + self.registry.sink.used + self.registry.sink.recycled_bytes
            ),
            store_connections_open=self.backend.pool.open_connections,
            store_connections_busy=self.backend.pool.busy_connections,
            arenas=self.registry.sink.arena_names,
        )  # fmt: skip
