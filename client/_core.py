"""What `Client` and `AsyncClient` share: configuration, requests, the Load stream's events,
peer tokens and lease ends. The two clients differ only in how they wait."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from tensorferry import env
from tensorferry.errors import DaemonUnavailable, FailedPrecondition, daemon_not_running
from tensorferry.peer_token import LEASE_END_KEY, PEER_KEY, peer_socket, peer_token
from tensorferry.v1 import tensorferry_pb2 as pb

if TYPE_CHECKING:
    from tensorferry.client._cuda import CudaTarget
    from tensorferry.cuda import CudaApi

#: ``progress(stage, bytes_done, bytes_total)``, called for each progress event of a load.
ProgressFn = Callable[[str, int, int], None]
# A tensor table of a large checkpoint comes in batches; one batch may exceed gRPC's 4 MiB.
# Reconnect backoff capped at 1 s (gRPC's default grows to 120 s): a restarted daemon is
# reached within about a second, and the leases of the models a worker holds with it.
# Not grpc.min_reconnect_backoff_ms: gRPC core also takes it as the minimum time a
# connection attempt may take, and at 100 ms a busy host's handshake timed out.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
C = TypeVar("C")
#: Seconds for the unary control calls (List, Status, Evict, Release).
CONTROL_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """PEM bytes for gRPC over TCP: the CA that signed the daemon's certificate, and this
    worker's key and certificate when the daemon requires client certificates."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


class LoadStream:
    """Reads a Load/Preload stream up to its ready event, one event at a time: the sync
    and the async client each feed it from their own kind of iterator."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self._progress = progress
        self.table: list[pb.TensorInfo] = []

    def feed(self, event: pb.LoadEvent) -> pb.Ready | None:
        """The ready event once it has come (then the table is complete), else None."""
        kind = event.WhichOneof("event")
        if kind == "progress" and self._progress is not None:
            p = event.progress
            self._progress(p.stage, p.bytes_done, p.bytes_total)
        elif kind == "tensors":
            self.table.extend(event.tensors.tensors)
        elif kind == "ready":
            if len(self.table) != event.ready.tensor_count:
                raise DaemonUnavailable(
                    f"the daemon announced {event.ready.tensor_count} tensors "
                    f"but sent {len(self.table)}"
                )
            return event.ready
        return None

    @staticmethod
    def ended() -> DaemonUnavailable:
        return DaemonUnavailable("the daemon ended the load without a ready event")


def collect(
    events: Iterable[pb.LoadEvent], progress: ProgressFn | None
) -> tuple[pb.Ready, list[pb.TensorInfo]]:
    """Read a Load/Preload stream up to its ready event."""
    stream = LoadStream(progress)
    for event in events:
        ready = stream.feed(event)
        if ready is not None:
            return ready, stream.table
    raise LoadStream.ended()


async def collect_async(
    events: AsyncIterable[pb.LoadEvent], progress: ProgressFn | None
) -> tuple[pb.Ready, list[pb.TensorInfo]]:
    """`collect` for a grpc.aio stream."""
    stream = LoadStream(progress)
    async for event in events:
        if (ready := stream.feed(event)) is not None:
            return ready, stream.table
    raise LoadStream.ended()


def not_resident(uri: str, timeout: float | None) -> DaemonUnavailable:
    """A load's ``timeout`` passed: the worker stops waiting, the daemon does not."""
    return DaemonUnavailable(
        f"{uri} was not resident within {timeout} s; the load goes on in the "
        "daemon (see `tensorferry status`)"
    )


def lease_end_of(code: grpc.StatusCode, trailers: Any) -> str:
    """Why a finished lease stream ended (``LoadedModel.lease_end``)."""
    for key, value in trailers or ():
        if key == LEASE_END_KEY:
            return str(value)
    return "closed" if code == grpc.StatusCode.CANCELLED else "lost"


class ClientCore:
    """Where the daemon is and what each call sends; `Client` and `AsyncClient` add the
    channel and the waiting. See `Client` for the arguments."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        tcp: str | None = None,
        tls: TlsConfig | None = None,
        cuda: CudaApi | None = None,
    ) -> None:
        self.tcp = tcp
        self._tls = tls or TlsConfig()
        self._cuda = cuda
        # Over TCP the address stands where error messages name the socket.
        self.socket = tcp if tcp is not None else str(env.socket_path(socket))
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        """Open the channel, with `_open` and the sync or the asyncio grpc module."""
        raise NotImplementedError

    def _open(self, insecure: Callable[..., C], secure: Callable[..., C]) -> C:
        if self.tcp is None:
            return insecure(f"unix:{self.socket}", options=CHANNEL_OPTIONS)
        return secure(self.tcp, self._tls.credentials(), options=CHANNEL_OPTIONS)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"this {type(self).__name__} is closed")
        if self.tcp is None and not os.path.exists(self.socket):
            raise daemon_not_running(self.socket, "no socket file")

    def _peer(self) -> tuple[tuple[str, str], ...]:
        """Who this process is, for calls on leases (over TCP the connection says it).
        Blocking: it may connect to the daemon's peer socket once per process."""
        if self.tcp is not None:
            return ()
        try:
            token = peer_token(self.socket)
        except OSError as exc:
            raise daemon_not_running(self.socket, f"{peer_socket(self.socket)}: {exc}") from None
        return ((PEER_KEY, token),) if token else ()

    def _target(self, device: str, *, importing: bool = True) -> CudaTarget | None:
        """This process's GPUs for a ``cuda`` device (their UUIDs go to the daemon)."""
        if device in ("", "cpu"):
            return None
        from tensorferry.client._cuda import resolve_target

        return resolve_target(device, self._cuda, importing=importing)

    @staticmethod
    def _load_request(
        uri: str, device: str, target: CudaTarget | None, client_name: str,
        select: Sequence[str], rank: int, world_size: int,
    ) -> pb.LoadRequest:  # fmt: skip
        return pb.LoadRequest(
            uri=uri, device=device, client_name=client_name or f"pid {os.getpid()}",
            select=select, rank=rank, world_size=world_size,
            gpu_uuids=target.uuids if target else (),
        )  # fmt: skip

    @staticmethod
    def _preload_request(
        uri: str, device: str, target: CudaTarget | None, select: Sequence[str], rank: int,
        world_size: int, pin: bool,
    ) -> pb.PreloadRequest:  # fmt: skip
        return pb.PreloadRequest(
            uri=uri, device=device, select=select, rank=rank, world_size=world_size,
            gpu_uuids=target.uuids if target else (), pin=pin,
        )  # fmt: skip

    @staticmethod
    def _evict_request(model: str, client_name: str) -> pb.EvictRequest:
        return pb.EvictRequest(model=model, client_name=client_name or f"pid {os.getpid()}")
