"""What a CountingProxy counts and the faults a test hook may ask of it.

A test writes a hook ``RequestInfo -> Fault | None``; the proxy classifies each request into a
``Kind``, asks the hook, and tallies the outcome in a ``Ledger`` that both the loop thread and
the test thread read.
"""

from __future__ import annotations

import enum
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

# A ranged GET from byte 0 shorter than this is a safetensors header probe, not a data read.
_HEADER_GET_LIMIT = 1 << 20
_HEADER_RANGE = re.compile(r"bytes=0-(\d+)$")


class Kind(str, enum.Enum):  # noqa: UP042 - StrEnum would change str(Kind.X) in test output
    HEAD = "head"
    HEADER_GET = "header_get"
    DATA_GET = "data_get"
    LIST = "list"
    OBJECT_GET = "object_get"
    OTHER = "other"


@dataclass(frozen=True)
class RequestInfo:
    number: int
    kind: Kind
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Fault:
    """What to do to one response. ``status`` answers from the proxy (only ``stall`` also
    applies); ``reset_after`` resets even when the body is shorter, right after it; offsets
    count payload bytes, so chunk framing is never touched."""

    content_range: str | None = None
    status: int | None = None
    s3_code: str = "SlowDown"
    reset_after: int | None = None
    flip_byte_at: int | None = None
    stall: float | None = None
    #: Forward this many body bytes, then close the connection cleanly (a short body with
    #: the original Content-Length), or keep it open and silent when ``hang`` is set.
    truncate_after: int | None = None
    hang: bool = False
    #: Sleep this long before forwarding each body read of up to 64 KiB (a slow link).
    trickle: float | None = None
    #: Forward the request without its Range header: the server answers 200, whole object.
    drop_range: bool = False
    #: Re-encode a Content-Length body as chunked, without Content-Length (as actix-files
    #: answers ranges and some proxies re-chunk them); the payload bytes are unchanged.
    rechunk: bool = False
    #: Drop Content-Length and end the body by closing the connection (HTTP/1.0 style).
    #: Like ``rechunk``, only for an answer that has a Content-Length.
    until_close: bool = False
    #: Replace the answer's ETag (an answer from another version, as a stale cache gives).
    etag: str | None = None
    #: Add this Content-Encoding to the answer (its bytes unchanged).
    content_encoding: str | None = None


FaultHook = Callable[[RequestInfo], Fault | None]


@dataclass
class Stats:
    """``faults_fired`` counts requests the hook returned a Fault for; ``open_connections``
    counts downstream connections, which close a moment after the client drops them."""

    requests: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    body_bytes: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    open_connections: int = 0
    #: Downstream connections accepted since the start (or the last reset).
    connections: int = 0
    faults_fired: int = 0
    log: list[RequestInfo] = field(default_factory=list)


def classify(method: str, target: str, headers: dict[str, str]) -> Kind:
    if method == "HEAD":
        return Kind.HEAD
    if method != "GET":
        return Kind.OTHER
    path, _, query = target.partition("?")
    if "list-type" in query or "/" not in path.strip("/"):
        return Kind.LIST
    rng = headers.get("range")
    if rng is None:
        return Kind.OBJECT_GET
    m = _HEADER_RANGE.match(rng.strip())
    return Kind.HEADER_GET if m and int(m[1]) < _HEADER_GET_LIMIT else Kind.DATA_GET


class Ledger:
    """The proxy's counters, request numbering and current hook, behind one lock: the loop
    thread writes them while the test thread reads them or swaps the hook."""

    def __init__(self, hook: FaultHook | None) -> None:
        self._hook = hook
        self._lock = threading.Lock()
        self._stats = Stats()
        self._number = 0

    def snapshot(self) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(
                requests=dict(s.requests),
                body_bytes=dict(s.body_bytes),
                open_connections=s.open_connections,
                connections=s.connections,
                faults_fired=s.faults_fired,
                log=list(s.log),
            )

    def reset(self) -> None:
        with self._lock:
            self._stats = Stats(open_connections=self._stats.open_connections)
            self._number = 0

    def set_hook(self, hook: FaultHook | None) -> None:
        with self._lock:
            self._hook = hook

    def admit(
        self, kind: Kind, method: str, target: str, headers: dict[str, str]
    ) -> tuple[RequestInfo, Fault | None]:
        with self._lock:
            self._number += 1
            info = RequestInfo(self._number, kind, method, target, headers)
            self._stats.requests[kind] += 1
            self._stats.log.append(info)
            hook = self._hook
        # Outside the lock: a hook may call stats() or set_fault().
        fault = hook(info) if hook is not None else None
        if fault is not None:
            with self._lock:
                self._stats.faults_fired += 1
        return info, fault

    def count_body(self, kind: Kind, n: int) -> None:
        with self._lock:
            self._stats.body_bytes[kind] += n

    def count_connection(self, delta: int) -> None:
        with self._lock:
            self._stats.open_connections += delta
            self._stats.connections += max(delta, 0)
