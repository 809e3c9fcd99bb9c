"""The asyncio twin of `Client`, for workers that run an event loop: the same methods with
the same arguments, each awaitable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

from tensorferry.client._core import (
    CONTROL_TIMEOUT,
    ClientCore,
    ProgressFn,
    collect_async,
    lease_end_of,
    not_resident,
)
from tensorferry.client._lease import Lease, Metadata, Restore
from tensorferry.client._model import LoadedModel, attach_model, close_released_gpu_mappings
from tensorferry.client._stream import Assembler, AsyncTensorStream
from tensorferry.errors import from_rpc_error
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

_LoadCall = grpc.aio.UnaryStreamCall[pb.LoadRequest, pb.LoadEvent]


class AsyncClient(ClientCore):
    """`Client` for asyncio; create and use it on one event loop.

    ``close()`` closes the channel, which ends every lease this client still holds: a
    grpc.aio channel belongs to its loop and cannot outlive it as `Client`'s does.
    """

    def _connect(self) -> None:
        self._channel = self._open(grpc.aio.insecure_channel, grpc.aio.secure_channel)
        self._stub = pb_grpc.LoaderStub(self._channel)
        self._leases: set[_LoadCall] = set()
        self._ends: set[asyncio.Task[None]] = set()

    async def _apeer(self) -> tuple[tuple[str, str], ...]:
        # The first call of a process connects to the peer socket: not on the loop.
        return () if self.tcp is not None else await asyncio.to_thread(self._peer)

    async def _call(self, method: Callable[..., Any], request: Any, *, peer: bool = False) -> Any:
        self._check_open()
        try:
            metadata = await self._apeer() if peer else ()
            return await method(request, timeout=CONTROL_TIMEOUT, metadata=metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    async def load(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, client_name: str = "", select: Sequence[str] = (),
        rank: int = 0, world_size: int = 0,
    ) -> LoadedModel:  # fmt: skip
        """See `Client.load`."""
        self._check_open()
        target = self._target(device)
        request = self._load_request(uri, device, target, client_name, select, rank, world_size)
        metadata = await self._apeer()
        call: _LoadCall = self._stub.Load(request, metadata=metadata)
        try:
            async with asyncio.timeout(timeout):
                ready, table = await collect_async(call, progress)
        except TimeoutError:
            call.cancel()
            raise not_resident(uri, timeout) from None
        except grpc.RpcError as err:
            call.cancel()
            raise from_rpc_error(err, self.socket) from None
        except BaseException:
            call.cancel()
            raise
        return attach_model(ready, target, table, self._hold(call, request, metadata))

    def stream(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, client_name: str = "", select: Sequence[str] = (),
        rank: int = 0, world_size: int = 0,
    ) -> AsyncTensorStream:  # fmt: skip
        """See `Client.stream`: ``async for name, tensor in client.stream(uri)``."""
        self._check_open()
        target = self._target(device)
        request = self._load_request(uri, device, target, client_name, select, rank, world_size)
        request.stream_tensors = True

        async def start() -> tuple[_LoadCall, Assembler]:
            metadata = await self._apeer()
            call: _LoadCall = self._stub.Load(request, metadata=metadata)
            return call, Assembler(progress, target, lambda: self._hold(call, request, metadata))

        return AsyncTensorStream(start, uri, self.socket, timeout)

    def _hold(self, call: _LoadCall, request: pb.LoadRequest, metadata: Metadata) -> Lease:
        """The lease that ``call`` holds (see `attach_model`). Re-established after a
        daemon restart over a sync channel of its own, in its own thread: it must not
        depend on this loop still running then."""
        loop = asyncio.get_running_loop()
        self._leases.add(call)

        def end_lease() -> None:
            # Runs wherever the last view is garbage-collected, maybe another thread.
            def cancel() -> None:
                self._leases.discard(call)
                call.cancel()

            with contextlib.suppress(RuntimeError):  # loop already closed: lease ended
                loop.call_soon_threadsafe(cancel)

        restore = (
            None
            if self.tcp is not None
            else Restore(self.socket, request, self._peer, bool(metadata))
        )
        lease = Lease(end_lease, restore)

        async def record_end() -> None:
            lease.ended(lease_end_of(await call.code(), await call.trailing_metadata()))

        def on_done(_: object) -> None:
            # A lease re-established after a restart is another call: forget this one.
            self._leases.discard(call)
            # The status is in; reading it is a coroutine, so the answer comes a moment later.
            task = loop.create_task(record_end())
            self._ends.add(task)
            task.add_done_callback(self._ends.discard)

        call.add_done_callback(on_done)
        return lease

    async def preload(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, select: Sequence[str] = (), rank: int = 0,
        world_size: int = 0, pin: bool = False,
    ) -> pb.Ready:  # fmt: skip
        """See `Client.preload`."""
        self._check_open()
        target = self._target(device, importing=False)
        request = self._preload_request(uri, device, target, select, rank, world_size, pin)
        try:
            return (await collect_async(self._stub.Preload(request, timeout=timeout), progress))[0]
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    async def read_file(self, uri: str, name: str, *, timeout: float | None = 60) -> bytes:
        """See `Client.read_file`."""
        self._check_open()
        request = pb.GetFileRequest(uri=uri, name=name)
        try:
            return b"".join([c.data async for c in self._stub.GetFile(request, timeout=timeout)])
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    async def release(self, lease_id: str) -> bool:
        """End a lease this process holds (LeaseNotOwned for another process's)."""
        request = pb.ReleaseRequest(lease_id=lease_id)
        return bool((await self._call(self._stub.Release, request, peer=True)).released)

    async def list(self) -> list[pb.ModelInfo]:
        return list((await self._call(self._stub.List, pb.ListRequest())).models)

    async def evict(self, model: str, client_name: str = "") -> pb.EvictResponse:
        """See `Client.evict`."""
        request = self._evict_request(model, client_name)
        response: pb.EvictResponse = await self._call(self._stub.Evict, request)
        return response

    async def status(self) -> pb.StatusResponse:
        response: pb.StatusResponse = await self._call(self._stub.Status, pb.StatusRequest())
        return response

    async def close(self) -> None:
        """Close the channel; this ends every lease this client still holds. GPU mappings
        whose views are gone are closed first (``close_released_gpu_mappings``)."""
        close_released_gpu_mappings()
        self._closed = True
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
