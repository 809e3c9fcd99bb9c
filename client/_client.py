"""The synchronous client: load a model through the daemon and get zero-copy tensors."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

from tensorferry.client._core import CONTROL_TIMEOUT, ClientCore, ProgressFn, collect, not_resident
from tensorferry.client._lease import Channel, Lease, Metadata, Restore
from tensorferry.client._model import LoadedModel, attach_model, close_released_gpu_mappings
from tensorferry.client._stream import Assembler, TensorStream
from tensorferry.errors import from_rpc_error
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc


class Client(ClientCore):
    """Talks to the tensorferry daemon over its Unix socket.

    ``socket`` defaults to $TENSORFERRY_SOCKET, else /run/tensorferry/tensorferry.sock.
    ``tcp="host:port"`` with ``tls=TlsConfig(...)`` talks gRPC over TLS instead (the daemon's
    ``[tcp]`` listener); arenas are still host-local, so the worker must share the
    daemon's /dev/shm. ``cuda``: the CUDA API that imports GPU arenas (default: cupy's,
    or the fake that $TENSORFERRY_FAKE_CUDA names in tests).
    """

    _channel: Channel | None

    def _connect(self) -> None:
        self._channel = Channel(self._open(grpc.insecure_channel, grpc.secure_channel))
        self._stub = pb_grpc.LoaderStub(self._channel.channel)

    def _lease(
        self, call: Any, request: pb.LoadRequest, metadata: Metadata, channel: Channel
    ) -> Lease:
        """The lease that ``call`` holds; it keeps the shared channel open until it ends,
        and over the Unix socket it is re-established after a daemon restart."""
        restore = (
            None
            if self.tcp is not None
            else Restore(self.socket, request, self._peer, bool(metadata))
        )
        lease = Lease(call.cancel, restore, channel)
        lease.watch(call)
        return lease

    def _call(self, method: Callable[..., Any], request: Any, *, peer: bool = False) -> Any:
        self._check_open()
        try:
            metadata = self._peer() if peer else ()
            return method(request, timeout=CONTROL_TIMEOUT, metadata=metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    def load(
        self,
        uri: str,
        device: str = "cpu",
        *,
        timeout: float | None = None,
        progress: ProgressFn | None = None,
        client_name: str = "",
        select: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 0,
    ) -> LoadedModel:
        """Load (or attach to) a model; blocks until it is resident, then holds a lease.

        ``select`` takes tensor names or glob patterns: only those tensors are fetched.
        ``rank``/``world_size``: for an artifact prepared with a shard plan, only this
        rank's slices (see `tensorferry prepare`). On a GPU the lease ends once the views
        are gone and an explicit point closed the mapping: ``LoadedModel.close()``, the
        next load, ``close()`` or ``tensorferry.client.close_released_gpu_mappings()``.
        """
        self._check_open()
        assert self._channel is not None  # _check_open: not closed
        target = self._target(device)
        request = self._load_request(uri, device, target, client_name, select, rank, world_size)
        # No deadline on the call: it is the lease, which outlives the wait for ready.
        metadata = self._peer()
        call = self._stub.Load(request, metadata=metadata)
        timer = threading.Timer(timeout, call.cancel) if timeout else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            ready, table = collect(call, progress)
        except grpc.RpcError as err:
            call.cancel()
            if (
                timer is not None
                and not timer.is_alive()
                and call.code() == grpc.StatusCode.CANCELLED
            ):
                raise not_resident(uri, timeout) from None
            raise from_rpc_error(err, self.socket) from None
        except BaseException:
            call.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return attach_model(
            ready, target, table, self._lease(call, request, metadata, self._channel)
        )

    def stream(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, client_name: str = "", select: Sequence[str] = (),
        rank: int = 0, world_size: int = 0,
    ) -> TensorStream:  # fmt: skip
        """`load`, with the tensors handed out as they land: ``for name, tensor in
        client.stream(uri)``, then ``.model`` holds the lease as `load`'s result does.

        Tensors come in landing order while the daemon fetches a CPU arena; a resident
        model (or a GPU load) gives them all at its ready event. ``timeout`` bounds the
        whole load, not the work done between tensors.
        """
        self._check_open()
        channel = self._channel
        assert channel is not None  # _check_open: not closed
        target = self._target(device)
        request = self._load_request(uri, device, target, client_name, select, rank, world_size)
        request.stream_tensors = True
        metadata = self._peer()
        call = self._stub.Load(request, metadata=metadata)
        timer = threading.Timer(timeout, call.cancel) if timeout else None
        if timer is not None:
            timer.daemon = True
            timer.start()

        return TensorStream(
            call,
            Assembler(progress, target, lambda: self._lease(call, request, metadata, channel)),
            uri, self.socket,
            timeout,
            timed_out=lambda: timer is not None and not timer.is_alive(),
            cleanup=timer.cancel if timer is not None else lambda: None,
        )  # fmt: skip

    def preload(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, select: Sequence[str] = (), rank: int = 0,
        world_size: int = 0, pin: bool = False,
    ) -> pb.Ready:  # fmt: skip
        """Make a model resident without holding it; returns the daemon's ready event.

        ``pin`` keeps it resident: it is never evicted to make room for another load.
        """
        self._check_open()
        target = self._target(device, importing=False)
        request = self._preload_request(uri, device, target, select, rank, world_size, pin)
        try:
            return collect(self._stub.Preload(request, timeout=timeout), progress)[0]
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    def read_file(self, uri: str, name: str, *, timeout: float | None = 60) -> bytes:
        """A non-weight file of the source (``LoadedModel.files`` lists them)."""
        self._check_open()
        request = pb.GetFileRequest(uri=uri, name=name)
        try:
            return b"".join(chunk.data for chunk in self._stub.GetFile(request, timeout=timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    def release(self, lease_id: str) -> bool:
        """End a lease this process holds (LeaseNotOwned for another process's)."""
        request = pb.ReleaseRequest(lease_id=lease_id)
        return bool(self._call(self._stub.Release, request, peer=True).released)

    def list(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.List, pb.ListRequest()).models)

    def evict(self, model: str, client_name: str = "") -> pb.EvictResponse:
        """Evict by model id or URI; requests waiting for it are told ``client_name``."""
        response: pb.EvictResponse = self._call(
            self._stub.Evict, self._evict_request(model, client_name)
        )
        return response

    def status(self) -> pb.StatusResponse:
        response: pb.StatusResponse = self._call(self._stub.Status, pb.StatusRequest())
        return response

    def close(self) -> None:
        """Close the client; leases of models whose tensors are still alive stay open.
        GPU mappings whose views are gone are closed here (``close_released_gpu_mappings``)."""
        close_released_gpu_mappings()
        self._closed = True
        if self._channel is not None:
            self._channel.release()
            self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
