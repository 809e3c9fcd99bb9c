"""A model's lease, for `Client` and `AsyncClient` alike: the open Load call that keeps its
arena resident while this process maps it, re-established when the daemon is back.

The daemon ends a lease's stream when it stops ("shutdown") or dies ("lost"); the worker's
views stay valid through its own mapping either way. A restarted daemon that adopted the
arena serves the same segment file again: a Load with ``resident_only`` attaches to it
without fetching and its stream becomes the lease, so eviction never frees an arena a
worker maps. A daemon that did not keep the arena answers FAILED_PRECONDITION (or names
another segment): the worker goes on without a lease. A restart is an ordinary event, so
all of this logs at INFO.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from tensorferry import env
from tensorferry.client._core import CHANNEL_OPTIONS, collect, lease_end_of
from tensorferry.errors import TensorferryError
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Metadata = tuple[tuple[str, str], ...]
#: Ends after which the daemon may come back with the arena (not "released", "closed", "error").
RESTORABLE = frozenset({"shutdown", "lost"})
FIRST_DELAY, MAX_DELAY = 0.05, 1.0
#: Answers of a daemon that is not back yet (still stopping, starting) or is busy: try again.
AGAIN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Bounds `Lease.end`'s wait for a restore thread that was told to stop (it stops at once).
JOIN_SECONDS = 5.0


class Channel:
    """A sync channel shared by a client and its leases; closed when neither needs it.

    A lease is an open Load call: closing the channel would end every lease, so models
    whose views are still alive keep it open after ``Client.close()``.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
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


@dataclasses.dataclass(frozen=True)
class Restore:
    """What re-establishing a CPU lease over the Unix socket needs."""

    socket: str
    request: pb.LoadRequest
    peer: Callable[[], Metadata]
    #: The first call carried a peer token: a restored lease must carry one too.
    had_peer: bool


class Lease:
    """One model's lease. ``cancel`` ends the first call (the client knows its kind);
    ``channel``: the shared sync channel it keeps open and restores over (None: the
    restore opens its own, as an aio channel belongs to its event loop)."""

    def __init__(
        self, cancel: Callable[[], None], restore: Restore | None = None,
        channel: Channel | None = None,
    ) -> None:  # fmt: skip
        if channel is not None:
            channel.acquire()
        self._channel = channel
        self._cancel, self._spec = cancel, restore
        # Reentrant: `end` may run from a garbage-collector finalizer on any thread.
        self._lock = threading.RLock()
        self._stop = threading.Event()  # set once, by `end`
        self._end: str | None = None
        self._gen = 0  # which call is current; ends of older ones are ignored
        self._ready: pb.Ready | None = None
        self._identity: tuple[int, int] | None = None
        self._trying: Any = None  # a restore's call before it is the lease
        self._threads: list[threading.Thread] = []
        self.restores = 0
        self.model_id = self.lease_id = ""

    def watch(self, call: Any) -> None:
        """Follow the first call's end, for a sync call (its status and trailers)."""
        call.add_done_callback(lambda c: self.ended(lease_end_of(c.code(), c.trailing_metadata())))

    def ended(self, reason: str) -> None:
        """The first call ended (the async client reads its status on its loop)."""
        self._ended(0, reason)

    def mapped(self, st: os.stat_result) -> None:
        """This process mapped the CPU segment ``st`` is of (`map_cpu_arena`)."""
        self._identity = (st.st_dev, st.st_ino)

    def ready(self, ready: pb.Ready) -> None:
        """The lease is granted (the ready event came); restorable from now on."""
        with self._lock:
            self._ready = ready
            self.model_id, self.lease_id = ready.model_id, ready.lease_id
            self._start()

    def end_reason(self) -> str | None:
        """`LoadedModel.lease_end`: None while a lease is held, else the last end's reason."""
        if self._end is not None:
            return self._end
        return "closed" if self._stop.is_set() else None

    def end(self) -> None:
        """End the lease (the last view is gone): cancel the current call, stop restoring."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()  # before reading what to cancel: see `_attempt`, `_hold`
            cancel, trying, threads = self._cancel, self._trying, list(self._threads)
            channel, self._channel = self._channel, None
        cancel()
        if trying is not None:
            trying.cancel()
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join(JOIN_SECONDS)
        if channel is not None:
            channel.release()

    def _ended(self, gen: int, reason: str) -> None:
        with self._lock:
            if gen != self._gen:
                return
            self._end = reason
            self._start()

    def _start(self) -> None:
        """Start restoring if the current call ended as one a restart ends (lock held)."""
        if (
            self._stop.is_set() or self._spec is None or self._ready is None
            or self._identity is None or self._end not in RESTORABLE
            or env.lease_restore_seconds() <= 0
        ):  # fmt: skip
            return
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(
            target=self._run, name=f"tensorferry-lease-{self.model_id}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        assert self._spec is not None  # `_start`
        uri = self._spec.request.uri
        try:
            seconds = env.lease_restore_seconds()
            deadline, delay = time.monotonic() + seconds, FIRST_DELAY
            while not self._stop.wait(delay):
                if self._attempt():
                    return
                if time.monotonic() > deadline:
                    log.info(
                        "the tensorferry daemon at %s was not back within %g s: the lease on "
                        "%s stays ended; its tensors stay valid through this process's own "
                        "mapping", self._spec.socket, seconds, uri,
                    )  # fmt: skip
                    return
                delay = min(delay * 2, MAX_DELAY)
        except Exception:
            log.warning("re-establishing the lease on %s failed", uri, exc_info=True)

    def _attempt(self) -> bool:
        """One try at the lease; False: try again (the daemon is not back yet)."""
        spec = self._spec
        assert spec is not None
        assert self._ready is not None
        if not os.path.exists(spec.socket):
            return False
        try:
            metadata = spec.peer()
        except (TensorferryError, OSError):
            return False
        if spec.had_peer and not metadata:
            return False  # its gRPC socket without its peer socket: a daemon not up yet
        channel = self._restore_channel()
        if channel is None:
            return True
        request = pb.LoadRequest()
        request.CopyFrom(spec.request)
        request.resident_only, request.stream_tensors = True, False
        call = pb_grpc.LoaderStub(channel.channel).Load(request, metadata=metadata)
        self._trying = call
        if self._stop.is_set():
            call.cancel()
            return True
        try:
            ready, _ = collect(call, None)
        except grpc.RpcError:
            call.cancel()
            code = call.code()
            if code in AGAIN:
                return False
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                self._without("it does not hold the model")
            elif not self._stop.is_set() and code != grpc.StatusCode.CANCELLED:
                self._without(f"{code.name}: {call.details()}")
            return True
        except TensorferryError:
            call.cancel()  # the stream ended without a ready event: a daemon stopping
            return False
        finally:
            self._trying = None
        if not self._same_arena(ready):
            call.cancel()
            self._without("it serves the model from another arena")
            return True
        self._hold(call, ready)
        return True

    def _restore_channel(self) -> Channel | None:
        with self._lock:
            if self._stop.is_set():
                return None
            if self._channel is None:
                assert self._spec is not None
                target = f"unix:{self._spec.socket}"
                self._channel = Channel(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
            return self._channel

    def _same_arena(self, ready: pb.Ready) -> bool:
        """The ready event grants the segment file this process maps, with the same model."""
        from tensorferry.client._views import SHM_DIR

        first = self._ready
        assert first is not None
        name = ready.cpu_shm.name if ready.WhichOneof("grant") == "cpu_shm" else ""
        if not name or "/" in name:
            return False
        try:
            st = os.stat(SHM_DIR / name)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity and (
            ready.tensor_count,
            ready.total_bytes,
        ) == (first.tensor_count, first.total_bytes)

    def _hold(self, call: Any, ready: pb.Ready) -> None:
        """Make a restore's call the lease."""
        with self._lock:
            self._gen += 1
            gen = self._gen
            self._cancel, self._end = call.cancel, None
            self.model_id, self.lease_id = ready.model_id, ready.lease_id
            self.restores += 1
        if self._stop.is_set():  # ended meanwhile: `end` may have cancelled the old call
            call.cancel()
            return
        assert self._spec is not None
        log.info(
            "tensorferry daemon restarted: lease on %s re-established (model %s)",
            self._spec.request.uri, ready.model_id,
        )  # fmt: skip
        call.add_done_callback(
            lambda c: self._ended(gen, lease_end_of(c.code(), c.trailing_metadata()))
        )

    def _without(self, why: str) -> None:
        assert self._spec is not None
        log.info(
            "tensorferry daemon restarted without the arena of %s (%s): its tensors stay "
            "valid through this process's own mapping, with no lease",
            self._spec.request.uri, why,
        )  # fmt: skip
