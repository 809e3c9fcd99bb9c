"""The synchronous client: load a model through the daemon and get zero-copy tensors."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from tensorferry import _env
from tensorferry._peer import LEASE_END_KEY, PEER_KEY, peer_socket, peer_token
from tensorferry.errors import (
    DaemonUnavailable,
    FailedPrecondition,
    daemon_not_running,
    from_rpc_error,
)
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

    from tensorferry.client._cuda import CudaTarget
    from tensorferry.cuda import CudaApi

ProgressFn = Callable[[str, int, int], None]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """PEM bytes for gRPC over TCP: the CA that signed the daemon's certificate, and this
    worker's key and certificate when the daemon requires client certificates."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None


class _Channel:
    """A channel shared by a client and its leases; closed when neither needs it.

    A lease is an open Load call: closing the channel would end every lease, so models
    whose views are still alive keep it open after ``Client.close()``.
    """

    def __init__(self, socket: str, tcp: str | None, tls: TlsConfig | None) -> None:
        if tcp is None:
            self.channel = grpc.insecure_channel(f"unix:{socket}", options=CHANNEL_OPTIONS)
        else:
            tls = tls or TlsConfig()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.root_certificates,
                private_key=tls.private_key,
                certificate_chain=tls.certificate_chain,
            )
            self.channel = grpc.secure_channel(tcp, credentials, options=CHANNEL_OPTIONS)
        self._users = 1
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.channel.close()


class LoadedModel:
    """A resident model's tensors, as zero-copy views of the daemon's arena.

    ``close()`` drops this object's references; the lease ends when the last view is
    gone, so a tensor kept past ``close()`` stays valid.
    """

    def __init__(
        self,
        ready: pb.Ready,
        tensors: dict[str, torch.Tensor],
        lease_end: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._lease_end = lease_end
        self.model_id = ready.model_id
        self.lease_id = ready.lease_id
        self.total_bytes = ready.total_bytes
        self.attached = ready.attached
        self.seconds = ready.seconds
        self.files = list(ready.files)
        self.tensors = tensors

    @property
    def lease_end(self) -> str | None:
        """None while the lease is held; then why it ended: "released" (Release),
        "shutdown" (the daemon stopped), "closed" (this process ended it), "lost" (the
        connection to the daemon broke)."""
        return self._lease_end()

    def close(self) -> None:
        self.tensors = {}

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LoadedModel {self.model_id} tensors={len(self.tensors)} bytes={self.total_bytes}>"


def collect(
    events: Iterator[pb.LoadEvent], progress: ProgressFn | None
) -> tuple[pb.Ready, list[pb.TensorInfo]]:
    """Read a Load/Preload stream up to its ready event."""
    table: list[pb.TensorInfo] = []
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "progress" and progress is not None:
            p = event.progress
            progress(p.stage, p.bytes_done, p.bytes_total)
        elif kind == "tensors":
            table.extend(event.tensors.tensors)
        elif kind == "ready":
            if len(table) != event.ready.tensor_count:
                raise DaemonUnavailable(
                    f"the daemon announced {event.ready.tensor_count} tensors but sent {len(table)}"
                )
            return event.ready, table
    raise DaemonUnavailable("the daemon ended the load without a ready event")


def lease_end_of(code: grpc.StatusCode, trailers: Any) -> str:
    """Why a finished lease stream ended (``LoadedModel.lease_end``)."""
    for key, value in trailers or ():
        if key == LEASE_END_KEY:
            return str(value)
    return "closed" if code == grpc.StatusCode.CANCELLED else "lost"


def attach_model(
    ready: pb.Ready,
    target: Any,
    table: list[pb.TensorInfo],
    end_lease: Callable[[], None],
    lease_end: Callable[[], str | None] = lambda: None,
) -> LoadedModel:
    """Map the ready event's grant and build the views; the lease ends if mapping fails."""
    # torch loads here, not at import: `tensorferry ls/status/evict` stay fast.
    from tensorferry.client._views import build_views, map_grant

    try:
        flat = map_grant(ready, target, end_lease)
    except BaseException:
        end_lease()
        raise
    return LoadedModel(ready, build_views(flat, table), lease_end)


class Client:
    """Talks to the tensorferry daemon over its Unix socket.

    ``socket`` defaults to $TENSORFERRY_SOCKET, else /run/tensorferry/tensorferry.sock.
    ``tcp="host:port"`` with ``tls=TlsConfig(...)`` talks gRPC over TLS instead (the daemon's
    ``[tcp]`` listener); arenas are still host-local, so the worker must share the
    daemon's /dev/shm. ``cuda``: the CUDA API that imports GPU arenas (default: cupy's,
    or the fake that $TENSORFERRY_FAKE_CUDA names in tests).
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        tcp: str | None = None,
        tls: TlsConfig | None = None,
        cuda: CudaApi | None = None,
    ) -> None:
        self.tcp = tcp
        self._cuda = cuda
        self.socket = tcp if tcp is not None else str(_env.socket_path(socket))
        self._channel: _Channel | None = _Channel(self.socket, tcp, tls)
        self._stub = pb_grpc.LoaderStub(self._channel.channel)

    def _peer(self) -> tuple[tuple[str, str], ...]:
        """Who this process is, for calls on leases (over TCP the connection says it)."""
        if self.tcp is not None:
            return ()
        try:
            token = peer_token(self.socket)
        except OSError as exc:
            raise daemon_not_running(self.socket, f"{peer_socket(self.socket)}: {exc}") from None
        return ((PEER_KEY, token),) if token else ()

    def _check_socket(self) -> None:
        if self.tcp is None and not os.path.exists(self.socket):
            raise daemon_not_running(self.socket, "no socket file")

    def _call(
        self, method: Callable[..., Any], request: Any, timeout: float | None, *, peer: bool = False
    ) -> Any:
        self._check_socket()
        try:
            return method(request, timeout=timeout, metadata=self._peer() if peer else ())
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
        rank's slices (see `tensorferry prepare`).
        """
        if self._channel is None:
            raise FailedPrecondition("this Client is closed")
        self._check_socket()
        name = client_name or f"pid {os.getpid()}"
        target = self._target(device)
        request = pb.LoadRequest(
            uri=uri, device=device, client_name=name, select=select, rank=rank,
            world_size=world_size, gpu_uuids=target.uuids if target else (),
        )  # fmt: skip
        call = self._stub.Load(request, metadata=self._peer())
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
                raise DaemonUnavailable(
                    f"{uri} was not resident within {timeout} s; the load goes on in the "
                    "daemon (see `tensorferry status`)"
                ) from None
            raise from_rpc_error(err, self.socket) from None
        except BaseException:
            call.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        channel = self._channel
        channel.acquire()

        def end_lease() -> None:
            call.cancel()
            channel.release()

        def lease_end() -> str | None:
            return lease_end_of(call.code(), call.trailing_metadata()) if call.done() else None

        return attach_model(ready, target, table, end_lease, lease_end)

    def preload(
        self, uri: str, device: str = "cpu", *, timeout: float | None = None,
        progress: ProgressFn | None = None, select: Sequence[str] = (), rank: int = 0,
        world_size: int = 0, pin: bool = False,
    ) -> pb.Ready:  # fmt: skip
        """Make a model resident without holding it; returns the daemon's ready event.

        ``pin`` keeps it resident: it is never evicted to make room for another load.
        """
        self._check_socket()
        target = self._target(device, importing=False)
        try:
            request = pb.PreloadRequest(
                uri=uri, device=device, select=select, rank=rank, world_size=world_size,
                gpu_uuids=target.uuids if target else (), pin=pin,
            )  # fmt: skip
            call = self._stub.Preload(request, timeout=timeout)
            return collect(call, progress)[0]
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None

    def _target(self, device: str, *, importing: bool = True) -> CudaTarget | None:
        """This process's GPUs for a ``cuda`` device (their UUIDs go to the daemon)."""
        if device in ("", "cpu"):
            return None
        from tensorferry.client._cuda import resolve_target

        return resolve_target(device, self._cuda, importing=importing)

    def read_file(self, uri: str, name: str, *, timeout: float | None = 60) -> bytes:
        """A non-weight file of the source (``LoadedModel.files`` lists them)."""
        self._check_socket()
        parts: list[bytes] = []
        try:
            for chunk in self._stub.GetFile(pb.GetFileRequest(uri=uri, name=name), timeout=timeout):
                parts.append(chunk.data)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.socket) from None
        return b"".join(parts)

    def release(self, lease_id: str) -> bool:
        """End a lease this process holds (LeaseNotOwned for another process's)."""
        response = self._call(
            self._stub.Release, pb.ReleaseRequest(lease_id=lease_id), 10, peer=True
        )
        return bool(response.released)

    def list(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.List, pb.ListRequest(), 10).models)

    def evict(self, model: str, client_name: str = "") -> pb.EvictResponse:
        """Evict by model id or URI; requests waiting for it are told ``client_name``."""
        request = pb.EvictRequest(model=model, client_name=client_name or f"pid {os.getpid()}")
        response: pb.EvictResponse = self._call(self._stub.Evict, request, 10)
        return response

    def status(self) -> pb.StatusResponse:
        response: pb.StatusResponse = self._call(self._stub.Status, pb.StatusRequest(), 10)
        return response

    def close(self) -> None:
        """Close the client; leases of models whose tensors are still alive stay open."""
        if self._channel is not None:
            self._channel.release()
            self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
