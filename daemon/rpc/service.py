"""The gRPC service: requests in, events out; a thin adapter over the loader and registry.

Admission and error mapping wrap every handler in ``daemon.rpc.admission.Gate``; a handler
only raises typed errors. A Load stream is a lease: the stream stays open after the ready
event until the worker goes away, calls Release, or the daemon stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tensorferry.daemon.config.settings import Settings
from tensorferry.daemon.devices import resolve_devices
from tensorferry.daemon.loader import Loader
from tensorferry.daemon.model import State
from tensorferry.daemon.records import LoadRecord
from tensorferry.daemon.registry import Registry
from tensorferry.daemon.rpc.admission import OpenCalls
from tensorferry.daemon.rpc.load_events import Waiting, table_events
from tensorferry.daemon.rpc.peers import Peer, Peers
from tensorferry.daemon.rpc.status import status_response
from tensorferry.daemon.rpc.validation import check_rank, check_select, extra_files
from tensorferry.daemon.source import check_allowed, list_source, parse_uri
from tensorferry.errors import (
    DaemonUnavailable,
    FailedPrecondition,
    InvalidRequest,
    LeaseNotOwned,
    SourceNotFound,
    quote,
)
from tensorferry.peer_token import LEASE_END_KEY
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
FILE_CHUNK = 1 << 20
MAX_FILE_BYTES = 256 << 20
WRITE_FAILED_GRACE = 2.0
NO_NEW_LOADS = (
    "the tensorferry daemon is shutting down and takes no new loads; retry when it is back"
)
Context = grpc.aio.ServicerContext[Any, Any]


async def _write(context: Context, message: Any) -> None:
    """Send one message of a stream; a client that went away is a cancellation, not an error."""
    try:
        await context.write(message)
    except Exception:
        # A write fails when the call ended under it (the client cancelled, or its deadline
        # passed), and gRPC cancels this handler a moment later: wait for that, so a client
        # that went away ends as the cancellation it is, not as an ERROR in the log.
        await asyncio.sleep(WRITE_FAILED_GRACE)
        raise


class LoaderService(pb_grpc.LoaderServicer):
    def __init__(
        self, settings: Settings, registry: Registry, loader: Loader, instance: str,
        peers: Peers | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.registry = registry
        self.loader = loader
        self.instance = instance
        #: Who calls (None: the peer socket is not served, e.g. in-process tests).
        self.peers = peers
        self.started = time.monotonic()
        self._released: dict[str, asyncio.Event] = {}
        #: Who took each open lease (None: a caller that sent no peer token).
        self._owners: dict[str, Peer | None] = {}
        self.stopping = asyncio.Event()
        self.draining = asyncio.Event()
        self.calls = OpenCalls()  # Load and Preload calls, until their status is sent

    async def end_calls(self, timeout: float) -> None:
        """End every lease and load; wait (up to ``timeout`` s) until each Load and Preload
        call sent its status. Before server.stop, whose GOAWAY and PING would go first: a
        worker answering the PING after the daemon hung up loses the status behind them."""
        self.stopping.set()
        self.registry.cancel_loads()
        await self.calls.ended(timeout)

    async def _events(
        self, request: pb.LoadRequest | pb.PreloadRequest, client: str, lease: bool
    ) -> AsyncIterator[pb.LoadEvent]:
        t0 = time.monotonic()
        if self.draining.is_set():
            raise DaemonUnavailable(NO_NEW_LOADS)
        ref = parse_uri(request.uri)
        devices = resolve_devices(
            request.device, request.gpu_uuids, self.registry.gpus, lease=lease
        )
        select = check_select(request.select)
        rank, world_size = check_rank(request.rank, request.world_size)
        check_allowed(ref, self.settings)
        yield pb.LoadEvent(progress=pb.Progress(stage="plan"))
        target = await self.loader.target(
            ref, devices, select, rank, world_size, t0, self.registry.find
        )
        if self.stopping.is_set():  # stopped while the source was listed: no new load
            raise DaemonUnavailable(NO_NEW_LOADS)
        if getattr(request, "resident_only", False):
            # A worker re-establishing its lease after a restart: attach, never fetch.
            resident = self.registry.find(target.key)
            if resident is None or resident.state is not State.READY:
                raise FailedPrecondition(
                    f"{ref.uri} is not resident in this daemon; resident_only loads only "
                    "attach (load it without resident_only to fetch it)"
                )
        model, existed = self.registry.get_or_start(
            target.key, ref.uri, target, client, target.fan_out
        )
        if existed and model.state is State.READY:
            yield pb.LoadEvent(progress=pb.Progress(stage="attach"))
        group = [model, *(m for k in target.fan_out if (m := self.registry.find(k)) is not None)]
        waiting = Waiting(model, group, lease and getattr(request, "stream_tensors", False))
        model.waiters += 1
        model.keep = model.keep or not lease  # a preload finishes even if its caller goes
        if getattr(request, "pin", False):
            self.registry.pin(model)
        try:
            async for event in waiting.events():
                yield event
        finally:
            self.registry.leave(model)  # (an arena announced early is never recycled)
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
        attached = existed and model.state is State.READY and waiting.bytes_sent < 0
        if attached:
            keyed, took = target.keyed - t0, time.monotonic() - t0
            self.loader.recent.append(LoadRecord(ref.uri, "attached", keyed, total_seconds=took))
        lease_id = self.registry.add_lease(model, client) if lease else ""
        released = asyncio.Event()
        if lease:
            self._released[lease_id] = released
        try:
            if not waiting.announced:
                for event in table_events(loaded.plan):
                    yield event
            yield pb.LoadEvent(
                ready=pb.Ready(
                    model_id=model.id, lease_id=lease_id, **loaded.arena.grant(),
                    tensor_count=len(loaded.plan.tensors), total_bytes=loaded.plan.tensor_bytes,
                    attached=attached, seconds=time.monotonic() - t0,
                    files=extra_files(target.listing),
                )
            )  # fmt: skip
            if lease:
                await self._hold(released)
        finally:
            if lease:
                self._released.pop(lease_id, None)
                self.registry.drop_lease(model, lease_id)

    async def _hold(self, released: asyncio.Event) -> None:
        """The open stream is the lease: hold it until the client goes away, calls Release,
        or the daemon stops."""
        async with asyncio.TaskGroup() as tg:
            stop, release = tg.create_task(self.stopping.wait()), tg.create_task(released.wait())
            await asyncio.wait([stop, release], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            release.cancel()
        if not released.is_set():
            # Not OK: the worker must tell this from a Release (see Load).
            raise DaemonUnavailable(
                "the tensorferry daemon is shutting down: this lease has ended; load the "
                "model again once the daemon is back"
            )

    def preload_events(self, uri: str) -> AsyncIterator[pb.LoadEvent]:
        return self._events(pb.PreloadRequest(uri=uri), "config preload", lease=False)

    def _caller(self, context: Context) -> Peer | None:
        return None if self.peers is None else self.peers.caller(context)

    # grpc.aio recognises streaming handlers by being async generator functions.
    async def Load(self, request: pb.LoadRequest, context: Context) -> AsyncIterator[pb.LoadEvent]:
        self.calls.track(context)
        client = request.client_name or context.peer()
        owner = self._caller(context)
        lease_id = ""
        try:
            async for event in self._events(request, client, lease=True):
                if event.WhichOneof("event") == "ready":
                    lease_id = event.ready.lease_id
                    self._owners[lease_id] = owner
                yield event
            # A lease's stream ends normally only by Release (a stop raises, and a client
            # that goes away cancels it).
            context.set_trailing_metadata(((LEASE_END_KEY, "released"),))
        except Exception:
            if lease_id:
                end = "shutdown" if self.stopping.is_set() else "error"
                context.set_trailing_metadata(((LEASE_END_KEY, end),))
            raise
        finally:
            self._owners.pop(lease_id, None)

    async def Preload(
        self, request: pb.PreloadRequest, context: Context
    ) -> AsyncIterator[pb.LoadEvent]:
        self.calls.track(context)
        async for event in self._events(request, context.peer(), lease=False):
            yield event

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        event = self._released.get(request.lease_id)
        if event is not None:
            owner, caller = self._owners.get(request.lease_id), self._caller(context)
            if owner is None or caller is None or caller.key != owner.key:
                # No exception for root: ending a lease is the holder's call; an operator
                # evicts the model (freed when the last lease ends) or stops the worker.
                unknown = "an unidentified process"
                raise LeaseNotOwned(
                    f"lease {quote(request.lease_id, bare=True)} is held by "
                    f"{owner.label if owner else unknown}; this call comes from "
                    f"{caller.label if caller else unknown}: only the process that holds a "
                    "lease can release it (it ends when that process closes the model or "
                    "exits)"
                )
            self.registry.end_early(request.lease_id)  # refuses GPU leases
            event.set()
        return pb.ReleaseResponse(released=event is not None)

    # Written with context.write (gRPC's other streaming form): a write under a client that
    # has gone away fails inside the handler, where it can be told from an error.
    async def GetFile(self, request: pb.GetFileRequest, context: Context) -> None:
        async for chunk in self._file_chunks(request):
            await _write(context, chunk)

    async def _file_chunks(self, request: pb.GetFileRequest) -> AsyncIterator[pb.FileChunk]:
        ref = parse_uri(request.uri)
        check_allowed(ref, self.settings)
        store = self.loader.open(ref)
        listing = await list_source(ref, store)
        obj = next((o for o in listing if o.key == request.name), None)
        if obj is None or request.name not in extra_files(listing):
            raise SourceNotFound(
                f"{ref.uri}: no file {quote(request.name)}; the files a source offers are "
                "listed in the ready event of Load"
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

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        return pb.ListResponse(models=[m.info() for m in self.registry.models])

    async def Evict(self, request: pb.EvictRequest, context: Context) -> pb.EvictResponse:
        if not request.model:
            raise InvalidRequest("evict needs a model id or URI")
        what, weights = request.model, ""
        if "://" in what or what.startswith("/"):
            ref = parse_uri(what)  # as Load normalises it
            check_allowed(ref, self.settings)  # before listing: nothing outside is touched
            what = ref.uri
            if not self.registry.named(what):
                # Another spelling of a resident source (its directory, its only file).
                weights = await self.loader.weights_of(ref)
        who = request.client_name or "an Evict call"
        done = self.registry.evict(what, by=who, weights=weights)
        return pb.EvictResponse(
            evicted=done.ids, pending_leases=done.pending_leases,
            refused_waiters=done.refused_waiters,
        )  # fmt: skip

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        return status_response(self.registry, self.loader, self.instance, self.started)
