"""Tensors as they land: a streamed Load (``stream_tensors``) read into (name, tensor) pairs.

The daemon sends the tensor table and the arena's grant as soon as the arena exists, then
``Landed`` events naming the tensors whose bytes are all in place; the worker maps the arena
once and hands each tensor on as it is named, so an engine copies weights while the rest
is fetched. The ready event yields whatever is left (a resident model: everything at once,
and an older daemon that does not stream: the same) and becomes a `LoadedModel`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from tensorferry.client._core import LoadStream, ProgressFn, not_resident
from tensorferry.client._model import LoadedModel, map_or_end
from tensorferry.errors import FailedPrecondition, from_rpc_error
from tensorferry.v1 import tensorferry_pb2 as pb

if TYPE_CHECKING:
    import torch

    from tensorferry.client._cuda import CudaTarget
    from tensorferry.client._lease import Lease

Pair = tuple[str, "torch.Tensor"]


class Assembler:
    """Events in, newly available tensors out; `model` once the ready event has come."""

    def __init__(
        self, progress: ProgressFn | None, target: CudaTarget | None,
        lease: Callable[[], Lease],
    ) -> None:  # fmt: skip
        self._stream = LoadStream(progress)
        self._target = target
        #: Called once, when the arena is mapped.
        self._lease = lease
        self._held: Lease | None = None
        self._flat: torch.Tensor | None = None
        self._given: set[int] = set()
        #: The arena event named a segment that was not there (see `_map_early`).
        self._missing = False
        self.model: LoadedModel | None = None

    def feed(self, event: pb.LoadEvent) -> list[Pair]:
        ready = self._stream.feed(event)
        kind = event.WhichOneof("event")
        if kind == "arena":
            self._map_early(event.arena)
        elif kind == "landed":
            return [] if self._missing else self._views(event.landed.tensors)
        if ready is None:
            return []
        if self._flat is None:
            self._map(ready)
        table = self._stream.table
        rest = self._views(i for i in range(len(table)) if i not in self._given)
        from tensorferry.client._views import build_views

        assert self._flat is not None
        assert self._held is not None
        views = build_views(self._flat, table)
        self._held.ready(ready)
        self.model = LoadedModel(ready, views, self._held)
        self._flat = None
        return rest

    def _map_early(self, arena: pb.Arena) -> None:
        """Map the arena of a load still fetching, if its segment is still there.

        The daemon removes that segment when the load is evicted or fails, maybe before
        this event is read: a missing segment is told from one this process cannot see
        by the stream's end, which is then the load's error, or a ready event whose
        segment is missing too (mapped, and refused, as a plain load's is). Until then
        the call stays open: no lease is taken, so nothing ends it.
        """
        if self._flat is not None or self._missing:
            return
        fd = None
        if arena.WhichOneof("grant") == "cpu_shm":
            from tensorferry.client._views import open_segment

            try:
                fd = open_segment(arena.cpu_shm)
            except FailedPrecondition:
                self._missing = True
                return
        self._map(arena, fd)

    def _map(self, grant: pb.Arena | pb.Ready, fd: int | None = None) -> None:
        if self._flat is not None:
            return
        try:
            self._held = lease = self._lease()
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._flat = map_or_end(grant, self._target, lease.end, fd, lease.mapped)

    def _views(self, indexes: Any) -> list[Pair]:
        if self._flat is None:
            raise FailedPrecondition("the daemon named landed tensors before their arena")
        from tensorferry.client._views import build_views

        table, out = self._stream.table, list[Pair]()
        for i in indexes:
            if i in self._given or i >= len(table):
                continue
            self._given.add(i)
            out += build_views(self._flat, [table[i]]).items()
        return out


class TensorStream:
    """``for name, tensor in client.stream(uri)``: tensors in landing order; then `model`
    (the lease, as `Client.load` returns it). Leaving the loop early ends the request."""

    def __init__(
        self, call: Any, assembler: Assembler, uri: str, socket: str, timeout: float | None,
        timed_out: Callable[[], bool], cleanup: Callable[[], None],
    ) -> None:  # fmt: skip
        self._call, self._asm, self._uri, self._socket = call, assembler, uri, socket
        self._timeout, self._timed_out, self._cleanup = timeout, timed_out, cleanup

    @property
    def model(self) -> LoadedModel:
        if self._asm.model is None:
            raise FailedPrecondition("the stream has not reached its ready event yet")
        return self._asm.model

    def __iter__(self) -> Iterator[Pair]:
        try:
            for event in self._call:
                yield from self._asm.feed(event)
                if self._asm.model is not None:
                    return
        except grpc.RpcError as err:
            self._call.cancel()
            if self._timed_out() and self._call.code() == grpc.StatusCode.CANCELLED:
                raise not_resident(self._uri, self._timeout) from None
            raise from_rpc_error(err, self._socket) from None
        except BaseException:
            if self._asm.model is None:  # once it exists, its views hold the lease
                self._call.cancel()
            raise
        finally:
            self._cleanup()
        raise LoadStream.ended()


class AsyncTensorStream:
    """`TensorStream` for `AsyncClient`: ``async for name, tensor in client.stream(uri)``."""

    def __init__(
        self, start: Callable[[], Awaitable[tuple[Any, Assembler]]], uri: str, socket: str,
        timeout: float | None,
    ) -> None:  # fmt: skip
        self._start, self._uri, self._socket, self._timeout = start, uri, socket, timeout
        self._model: LoadedModel | None = None

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            raise FailedPrecondition("the stream has not reached its ready event yet")
        return self._model

    async def __aiter__(self) -> AsyncIterator[Pair]:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        self._call, self._asm = await self._start()
        events = aiter(self._call)
        try:
            while self._asm.model is None:
                # The deadline covers the daemon's events, not the caller's work between.
                async with asyncio.timeout_at(deadline):
                    event = await anext(events, None)
                if event is None:
                    raise LoadStream.ended()
                pairs = self._asm.feed(event)
                self._model = self._asm.model
                for pair in pairs:
                    yield pair
        except TimeoutError:
            self._call.cancel()
            raise not_resident(self._uri, self._timeout) from None
        except grpc.RpcError as err:
            self._call.cancel()
            raise from_rpc_error(err, self._socket) from None
        except BaseException:
            if self._asm.model is None:  # once it exists, its views hold the lease
                self._call.cancel()
            raise
