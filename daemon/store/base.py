"""The storage interface every source backend implements."""

from __future__ import annotations

import abc
import contextvars
import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str  # name relative to the store's root (a file name for local directories)
    size: int
    etag: str  # identifies this version of the object


class Store(abc.ABC):
    """One source location: a bucket prefix or a local directory.

    ``read`` serves small reads (headers, index files) and returns bytes; ``read_into``
    is the data path and writes straight into ``dest`` (an arena or a ring slot).
    """

    #: The location as a user wrote it, for messages.
    uri: str

    @abc.abstractmethod
    async def list_objects(self) -> list[ObjectInfo]:
        """Objects directly under the location (not recursive)."""

    @abc.abstractmethod
    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object."""

    @abc.abstractmethod
    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        """Fill ``dest`` with bytes [start, start + len(dest)) of the object."""

    def forget(self, obj: ObjectInfo, start: int, length: int) -> None:  # noqa: B027
        """Drop any local copy of these bytes: they failed a check. Only caches keep any."""

    def describe(self, obj: ObjectInfo) -> str:
        return f"{self.uri.rstrip('/')}/{obj.key}"


@dataclasses.dataclass
class BodyMeter:
    """Body bytes received so far by one load's GETs, counted by the HTTP connections as
    they arrive (``METER`` names the load's meter in its fetch workers' context)."""

    bytes: int = 0
    #: 503 SlowDowns the load's GETs got: the store, not the link, is the limit.
    slowdowns: int = 0


METER: contextvars.ContextVar[BodyMeter | None] = contextvars.ContextVar(
    "tensorferry_meter", default=None
)


@dataclasses.dataclass(eq=False)  # one GET's: kept in sets by identity
class GetTiming:
    """When one range's GET went out and when its first byte came back (monotonic), set
    by the HTTP connection for the hedger: a GET with no answer long after it was sent is
    a straggler, while one still waiting for a SlowDown pause or a connection is not."""

    sent: float | None = None
    first_byte: float | None = None
    #: Told the first-byte latency as soon as it is known, not when the range completes:
    #: on a slow link every range may have started before the first one completes.
    on_first_byte: Callable[[float], None] | None = None

    def answered(self, now: float) -> None:
        self.first_byte = now
        if self.on_first_byte is not None and self.sent is not None:
            self.on_first_byte(now - self.sent)


TIMING: contextvars.ContextVar[GetTiming | None] = contextvars.ContextVar(
    "tensorferry_timing", default=None
)


class StoreEvents:
    """What the store layer reports as it works, to whoever subscribed (the metrics):
    handed to the backend and its pools when they are built, so none is patched later."""

    def __init__(self) -> None:
        self._gets: list[Callable[[float], None]] = []
        self._fallbacks: list[Callable[[], None]] = []

    def subscribe(
        self, *, get_seconds: Callable[[float], None], fallback: Callable[[], None]
    ) -> None:
        self._gets.append(get_seconds)
        self._fallbacks.append(fallback)

    def got(self, seconds: float) -> None:
        """A range GET succeeded in ``seconds``."""
        for observe in self._gets:
            observe(seconds)

    def fell_back(self) -> None:
        """A range a proxy failed was asked of the store directly."""
        for count in self._fallbacks:
            count()
