"""The last loads and how each went, for Status, the log and metrics."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from tensorferry.daemon.logs import log_load
from tensorferry.v1 import tensorferry_pb2 as pb

RECENT_LOADS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class LoadRecord:
    """One load. Every *_seconds but fetch_seconds counts from the request's arrival."""

    uri: str
    outcome: str  # ready, attached, failed, cancelled
    plan_seconds: float = 0.0
    first_byte_seconds: float = 0.0
    fetch_seconds: float = 0.0
    total_seconds: float = 0.0
    bytes: int = 0
    error: str = ""
    retries: int = 0
    retry_causes: tuple[tuple[str, int], ...] = ()
    hedges: int = 0
    workers: int = 0
    arena_seconds: float = 0.0


class RecentLoads(collections.deque[LoadRecord]):
    """The last loads; each one added is also logged and handed to the subscribers."""

    def __init__(self, maxlen: int = RECENT_LOADS) -> None:
        super().__init__(maxlen=maxlen)
        self._subscribers: list[Callable[[LoadRecord], None]] = []

    def subscribe(self, on_record: Callable[[LoadRecord], None]) -> None:
        self._subscribers.append(on_record)

    def append(self, record: LoadRecord) -> None:
        super().append(record)
        log_load(record)
        for on_record in self._subscribers:
            on_record(record)


def as_message(r: LoadRecord) -> pb.LoadRecord:
    return pb.LoadRecord(
        uri=r.uri, outcome=r.outcome, plan_seconds=r.plan_seconds,
        first_byte_seconds=r.first_byte_seconds, fetch_seconds=r.fetch_seconds,
        total_seconds=r.total_seconds, bytes=r.bytes,
        gbps=r.bytes / r.total_seconds / 1e9 if r.total_seconds else 0.0,
        error=r.error, retries=r.retries, retry_causes=dict(r.retry_causes),
        hedges=r.hedges, workers=r.workers, arena_seconds=r.arena_seconds,
    )  # fmt: skip
