"""The asyncio twin of `Client`, for workers that run an event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from tensorferry import _env
from tensorferry._peer import PEER_KEY, peer_socket, peer_token
from tensorferry.client._client import (
    CHANNEL_OPTIONS,
    LoadedModel,
    ProgressFn,
    attach_model,
    lease_end_of,
)
from tensorferry.errors import DaemonUnavailable, daemon_not_running, from_rpc_error
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tensorferry.cuda import CudaApi


class AsyncClient:
    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, cuda: CudaApi | None = None
    ) -> None:
        self.socket = str(_env.socket_path(socket))
        self._cuda = cuda  # as in Client
        self._channel = grpc.aio.insecure_channel(f"unix:{self.socket}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LoaderStub(self._channel)
        self._leases: set[grpc.aio.UnaryStreamCall[pb.LoadRequest, pb.LoadEvent]] = set()
        self._ends: set[asyncio.Task[None]] = set()

    async def _peer(self) -> tuple[tuple[str, str], ...]:
        """Who this process is, for Load and Release (see ``Client._peer``)."""
        try:
            token = await asyncio.to_thread(peer_token, self.socket)
        except OSError as exc:
            raise daemon_not_running(self.socket, f"{peer_socket(self.socket)}: {exc}") from None
        return ((PEER_KEY, token),) if token else ()

    async def load(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, client_name: str = "", select: Sequence[str] = (),
        rank: int = 0, world_size: int = 0,
    ) -> LoadedModel:  # fmt: skip
        if not os.path.exists(self.socket):
            raise daemon_not_running(self.socket, "no socket file")
        name = client_name or f"pid {os.getpid()}"
        target = None
        if device not in ("", "cpu"):
            from tensorferry.client._cuda import resolve_target

            target = resolve_target(device, self._cuda)
        request = pb.LoadRequest(
            uri=uri, device=device, client_name=name, select=select, rank=rank,
            world_size=world_size, gpu_uuids=target.uuids if target else (),
        )  # fmt: skip
        call = self._stub.Load(request, metadata=await self._peer())
        table: list[pb.TensorInfo] = []
        try:
            async with asyncio.timeout(timeout):
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "progress" and progress is not None:
                        progress(event.progress.stage, event.progress.bytes_done,
                                 event.progress.bytes_total)  # fmt: skip
                    elif kind == "tensors":
                        table.extend(event.tensors.tensors)
                    elif kind == "ready":
                        break
                else:
                    raise DaemonUnavailable("the daemon ended the load without a ready event")
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None
        except BaseException:
            call.cancel()
            raise

        ready = event.ready
        loop = asyncio.get_running_loop()
        self._leases.add(call)

        def end_lease() -> None:
            # Runs wherever the last view is garbage-collected, maybe another thread.
            def cancel() -> None:
                self._leases.discard(call)
                call.cancel()

            with contextlib.suppress(RuntimeError):  # loop already closed: lease ended
                loop.call_soon_threadsafe(cancel)

        ended: list[str] = []

        async def record_end() -> None:
            ended.append(lease_end_of(await call.code(), await call.trailing_metadata()))

        def on_done(_: object) -> None:
            # The status is in; reading it is a coroutine, so the answer comes a moment later.
            task = loop.create_task(record_end())
            self._ends.add(task)
            task.add_done_callback(self._ends.discard)

        call.add_done_callback(on_done)
        return attach_model(ready, target, table, end_lease, lambda: ended[0] if ended else None)

    async def release(self, lease_id: str) -> bool:
        """End a lease this process holds (LeaseNotOwned for another process's)."""
        request = pb.ReleaseRequest(lease_id=lease_id)
        try:
            response = await self._stub.Release(request, timeout=10, metadata=await self._peer())
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None
        return bool(response.released)

    async def status(self) -> pb.StatusResponse:
        try:
            response: pb.StatusResponse = await self._stub.Status(pb.StatusRequest(), timeout=10)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None
        return response

    async def close(self) -> None:
        """Close the channel; this ends every lease this client still holds."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
