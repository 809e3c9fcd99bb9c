"""Races at a model's and the daemon's edges (issue #25): an Evict as a load starts, a
streamed load evicted under its worker, the final status of every lease when the daemon
stops, and Evict by a URI outside the allowlist."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tensorferry.client import Client
from tensorferry.client._stream import Assembler
from tensorferry.daemon.config.settings import Settings
from tensorferry.daemon.loader import Loader
from tensorferry.daemon.records import RecentLoads
from tensorferry.daemon.registry import Registry
from tensorferry.daemon.rpc.load_events import Waiting
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink
from tensorferry.daemon.source import parse_uri
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.proxy import CountingProxy, Fault, FaultHook, Kind, RequestInfo
from tensorferry.devtools.seaweed import S3Server
from tensorferry.errors import ModelEvicted, TensorferryError
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests._hardening_leases_helpers import local_daemon, write_lease_model
from tests.conftest import BUCKET, daemon_env, eventually, running_daemon, short_dir, upload

SHUTDOWN = (
    "the tensorferry daemon is shutting down: this lease has ended; load the model again "
    "once the daemon is back"
)


async def test_an_evict_as_a_load_task_is_created_fails_its_waiters(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root / "m", 1 << 20, layer_bytes=1 << 19)
    (tmp_path / "shm").mkdir()
    settings = Settings(allow=(str(root),))
    async with CpuShmSink(tmp_path / "shm") as sink, asyncio.TaskGroup() as tasks:
        loader = Loader(settings, sink, None, None, None, RecentLoads())
        registry = Registry(sink, tasks, loader)
        ref = parse_uri(str(root / "m"))
        target = await loader.target(ref, ["cpu"], (), 0, 0, time.monotonic())
        model, existed = registry.get_or_start(target.key, ref.uri, target, "worker")
        assert not existed
        model.waiters += 1  # a request waits for it, as the service's do
        # The Evict lands in the same loop iteration: before the load task's first step.
        registry.evict(ref.uri, by="an operator")
        waiting = Waiting(model, [model], stream=False)
        async with asyncio.timeout(5):
            async for _ in waiting.events():
                pass
        with pytest.raises(ModelEvicted) as info:
            model.done.result()
        assert info.value.message == (
            f"{ref.uri} was evicted by an operator before it was ready (model {model.id}); "
            "load it again"
        )
        assert registry.models == []
        assert registry.find(target.key) is None
        # Nothing is left half there: the next load of the model starts afresh and finishes.
        again, existed = registry.get_or_start(target.key, ref.uri, target, "worker")
        assert not existed
        async with asyncio.timeout(10):
            loaded = await again.done
        assert loaded.plan.tensors
        assert [m.state.value for m in registry.models] == ["ready"]
        registry.close()


def stall_the_tail(size: int) -> FaultHook:
    """Hold the GETs of the file's last 2 MiB: the load stays loading until it is evicted."""

    def fault(req: RequestInfo) -> Fault | None:
        if req.kind is not Kind.DATA_GET:
            return None
        start = int(req.headers["range"].removeprefix("bytes=").split("-")[0])
        return Fault(stall=60.0) if start >= size - (2 << 20) else None

    return fault


def test_a_streamed_load_evicted_before_its_worker_maps_the_arena_gets_the_eviction_error(
    s3: S3Server, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    [path] = write_model(tmp_path / "m", 8 << 20, layer_bytes=1 << 20, seed=5)
    uri = upload(s3, tmp_path / "m", prefix)
    config = 'chunk_size = "1MiB"\nconcurrency = 2'
    with (
        CountingProxy(s3.endpoint, fault=stall_the_tail(path.stat().st_size)) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/"], s3_config=config
        ) as d,
        d.client() as client,
        d.client() as operator,
    ):
        feed = Assembler.feed
        arenas: list[pb.Arena] = []

        def evicted_first(assembler: Assembler, event: pb.LoadEvent) -> Any:
            if event.WhichOneof("event") == "arena" and not arenas:
                # The worker reads the arena event only once the model has been evicted and
                # its segment removed (a worker descheduled for a moment).
                arenas.append(event.arena)
                operator.evict(uri, client_name="an operator")
                name = event.arena.cpu_shm.name
                eventually(lambda: name not in d.segments(), "the evicted arena removed")
            return feed(assembler, event)

        monkeypatch.setattr(Assembler, "feed", evicted_first)
        with pytest.raises(TensorferryError) as info:
            for _ in client.stream(uri):
                pass
        [arena] = arenas
        assert type(info.value) is ModelEvicted
        assert info.value.message == (
            f"{uri} was evicted by an operator before it was ready (model {arena.model_id}); "
            "load it again"
        )
        eventually(lambda: operator.list() == [], "the evicted model forgotten")


class Relay:
    """A Unix socket in front of the daemon's that keeps, per connection, the bytes the
    daemon sent: the HTTP/2 frames in the order they went out."""

    def __init__(self, upstream: Path) -> None:
        self.socket = short_dir() / "relay.sock"
        self._upstream = upstream
        self.sent: list[bytearray] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket))
        self._listener.listen(64)
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> Relay:
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        for s in [self._listener, *self._sockets]:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sockets += [down, up]
            try:
                up.connect(str(self._upstream))
            except OSError:  # the daemon is gone: a channel reconnecting
                down.close()
                continue
            sent = bytearray()
            self.sent.append(sent)
            for args in ((down, up, None), (up, down, sent)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(t)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if keep is not None:
                    keep += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def frames(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, flags, stream id) of each HTTP/2 frame a server sent (no preface that way)."""
    i = 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        stream = int.from_bytes(data[i + 5 : i + 9], "big") & 0x7FFFFFFF
        yield data[i + 3], data[i + 4], stream
        i += 9 + length


HEADERS, GOAWAY, END_STREAM = 0x1, 0x7, 0x1
CHANNELS, STREAMS_PER_CHANNEL = 8, 4


def test_every_lease_gets_its_shutdown_status_before_the_daemon_hangs_up(
    local_root: Path,
) -> None:
    uri = write_lease_model(local_root)
    with local_daemon(local_root) as d, Relay(d.socket) as relay:
        # A connection each, as workers have.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.insecure_channel(f"unix:{relay.socket}", options=options) for _ in range(CHANNELS)
        ]
        leases = []
        for channel in channels:
            for _ in range(STREAMS_PER_CHANNEL):
                raw = pb_grpc.LoaderStub(channel).Load(pb.LoadRequest(uri=uri))
                while next(raw).WhichOneof("event") != "ready":
                    pass
                leases.append(raw)
        assert d.stop() == 0
        for raw in leases:
            assert (raw.code(), raw.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTDOWN)
            assert ("tensorferry-lease-end", "shutdown") in raw.trailing_metadata()
        for channel in channels:
            channel.close()
    # The cause of "Stream removed (sendmsg: Broken pipe)": a status that left after the
    # GOAWAY. On every connection each stream's status goes out first.
    assert len(relay.sent) == CHANNELS
    for sent in relay.sent:
        order = list(frames(bytes(sent)))
        goaway = next(i for i, (kind, _, _) in enumerate(order) if kind == GOAWAY)
        ended = [s for kind, flags, s in order if kind == HEADERS and flags & END_STREAM]
        assert len(ended) == STREAMS_PER_CHANNEL
        assert ended == [
            s for kind, flags, s in order[:goaway] if kind == HEADERS and flags & END_STREAM
        ]


def test_evict_by_a_uri_outside_the_allowlist_is_refused_before_it_is_listed(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    upload(s3, tmp_path / "m", f"{prefix}elsewhere/")
    outside = tmp_path / "outside"
    write_model(outside, 1 << 20, layer_bytes=1 << 19)
    with (
        CountingProxy(s3.endpoint) as proxy,
        running_daemon(
            daemon_env(s3, proxy.endpoint), allow=[f"s3://{BUCKET}/{prefix}allowed/"]
        ) as d,
        Client(d.socket) as client,
    ):
        proxy.reset()
        s3_uri = f"s3://{BUCKET}/{prefix}elsewhere/"
        # A directory is named as Load names it: with its trailing slash.
        for uri, named in ((s3_uri, s3_uri), (str(outside), f"{outside}/")):
            with pytest.raises(TensorferryError) as info:
                client.evict(uri)
            assert type(info.value).__name__ == "SourceNotAllowed"
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.message == (
                f"{named} is not in the daemon's source allowlist; an operator can add it "
                "under [sources] allow in the daemon's config"
            )
            with pytest.raises(TensorferryError) as load:
                client.load(uri)
            assert (load.value.code, load.value.message) == (info.value.code, info.value.message)
        assert proxy.stats().requests == dict.fromkeys(Kind, 0)  # nothing was listed


async def test_an_arena_announced_to_a_streaming_worker_is_never_recycled() -> None:
    # The worker maps the arena at the Arena event and may hand out views before its lease
    # exists (the ready event): an eviction in between must not put those pages in the
    # recycle pool, where the next load would write another model's bytes under the views.
    from types import SimpleNamespace
    from typing import cast

    from tensorferry.daemon.arrivals import Arrivals
    from tensorferry.daemon.model import Model

    model = Model("m1", cast(Any, None), "s3://models/m/")
    arrivals = SimpleNamespace(plan=SimpleNamespace(tensors=[]), grant={}, order=[])
    events = Waiting(model, [model], stream=True)._streamed(cast(Arrivals, arrivals))
    assert [e.WhichOneof("event") for e in events] == ["arena"]
    assert model.released_early
