"""An "S3-like link" for tests and benches: a CountingProxy hook that shapes ranged GETs.

    shape = LinkShape.parse("first_byte_ms=30,rate_mbps=90,stall_fraction=0.01")
    hook = link_hook(shape)
    with CountingProxy(server.endpoint, fault=hook) as proxy: ...
    print(hook.stalled)

Only ``Kind.DATA_GET`` responses are shaped; HEAD, LIST and header probes pass untouched, as
S3 metadata calls are not what a loader's throughput depends on.

First byte: a lognormal delay with median ``first_byte_ms`` and sigma chosen so that its p99
is ``first_byte_ms + tail_ms`` (defaults: median 30 ms, p99 90 ms, p99.9 ~129 ms). A fraction
``stall_fraction`` of responses waits ``stall_seconds`` more (a stuck S3 node).

Rate: the proxy's ``trickle`` sleeps before each 64 KiB body read, but event-loop timers are
too coarse for that at S3-like rates: 64 KiB / 90 MB/s is 0.73 ms, and uvloop rounds a sleep to
whole milliseconds (0.7 ms sleeps 1 ms; 0.5 ms does not sleep at all, so ``trickle=chunk/rate``
caps nothing above ~130 MB/s), and each trickled read costs ~0.2-0.6 ms more. So the hook
paces reads at the whole millisecond at or under 64 KiB / rate (none above 65 MB/s: 1 MiB
reads, unpaced) and puts the time that pacing leaves short into the first-byte stall, from the
Range length. Nominally the last byte then comes exactly ``length / rate`` after the first-byte
delay; the proxy's real costs only add to that, so the cap holds and the effective rate sits
somewhat under it. Measured (8 MiB ranges, loopback SeaweedFS, boto3 in another process, a
busy 16-core box where unshaped ran at ~135 MB/s), cap -> effective MB/s, naive trickle in
brackets: 20 -> 17 (18), 40 -> 33 (25), 60 -> 43 (46), 90 -> 70 (47), 200 -> 118 (215).
One proxy is one event-loop thread: many connections share its ~1 GB/s at best.

Draws are deterministic for a seed *and a request order*: concurrent requests reach the
hook in whatever order the network gives, so only a serial client replays exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from dataclasses import dataclass
from random import Random
from statistics import NormalDist

from tensorferry.devtools.faults import Fault, FaultHook, Kind, RequestInfo

#: The proxy's body read size when trickle is set (``_wire._pipe``).
_CHUNK = 64 << 10
#: z of the 99th percentile of a standard normal: p99 = median * exp(sigma * _Z99).
_Z99 = NormalDist().inv_cdf(0.99)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")
# inv_cdf is undefined at 0 and 1; random() can return 0.0.
_U_MIN, _U_MAX = 1e-12, 1.0 - 1e-12


@dataclass(frozen=True)
class LinkShape:
    """How one simulated S3 link behaves. Rates are MB/s of 10**6 bytes, per connection;
    ``rate_mbps=inf`` means no cap."""

    first_byte_ms: float = 30.0
    tail_ms: float = 60.0
    rate_mbps: float = 90.0
    stall_fraction: float = 0.0
    stall_seconds: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("first_byte_ms", "tail_ms", "stall_seconds"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.rate_mbps > 0:
            raise ValueError(f"rate_mbps must be > 0 (inf for no cap), got {self.rate_mbps!r}")
        if not 0 <= self.stall_fraction <= 1:
            raise ValueError(f"stall_fraction must be in [0, 1], got {self.stall_fraction!r}")

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """``"first_byte_ms=30,rate_mbps=90,stall_fraction=0.01"``; keys left out keep their
        defaults, an empty string gives the default shape."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, float | int] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            key, sep, raw = (part.strip() for part in item.partition("="))
            if key not in fields:
                accepted = ", ".join(fields)
                raise ValueError(f"unknown link key {key!r}; accepted keys: {accepted}")
            if not sep or not raw:
                raise ValueError(f"link key {key!r} needs a value: {key}=...")
            if key in values:
                raise ValueError(f"link key {key!r} given twice")
            try:
                # Field types are strings here (postponed annotations).
                values[key] = int(raw) if fields[key] == "int" else float(raw)
            except ValueError:
                raise ValueError(f"link key {key!r}: not a number: {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]  # keys and types checked above

    def first_byte_s(self, u: float) -> float:
        """The first-byte delay at quantile ``u`` of the lognormal."""
        if self.first_byte_ms == 0:
            return 0.0  # a lognormal has no zero median; no delay at all
        sigma = math.log1p(self.tail_ms / self.first_byte_ms) / _Z99
        z = NormalDist().inv_cdf(min(max(u, _U_MIN), _U_MAX))
        return self.first_byte_ms * math.exp(sigma * z) / 1000

    def pacing(self, length: int | None) -> tuple[float | None, float]:
        """``(trickle, extra stall)`` for a body of ``length`` bytes (None: unknown)."""
        if math.isinf(self.rate_mbps):
            return None, 0.0
        per_read_ms = _CHUNK / (self.rate_mbps * 1e3)
        if length is None:
            # No length to top up against: pace at the next whole ms, i.e. under the cap.
            return math.ceil(per_read_ms) / 1000, 0.0
        # Whole milliseconds only (timer resolution); floor keeps the body no slower than
        # the cap, and the stall makes up the rest. 0 ms: no trickle, 1 MiB reads, all stall.
        whole_ms = math.floor(per_read_ms)
        reads = -(-length // _CHUNK)
        extra = max(0.0, length / (self.rate_mbps * 1e6) - reads * whole_ms / 1000)
        return (whole_ms / 1000 if whole_ms else None), extra


def range_length(headers: dict[str, str]) -> int | None:
    """The byte count a closed ``Range: bytes=a-b`` asks for (the server may send fewer)."""
    m = _RANGE.match(headers.get("range", "").strip())
    return int(m[2]) - int(m[1]) + 1 if m else None


class LinkHook:
    """The CountingProxy hook for a LinkShape. ``shaped`` counts DATA_GETs it saw,
    ``stalled`` those it stalled; both are safe to read from any thread."""

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self._rng = Random(shape.seed)
        # The proxy calls hooks from its loop thread only, but a bench may share one hook
        # between proxies (one loop thread each): draws and counts must not interleave.
        self._lock = threading.Lock()
        self.shaped = 0
        self.stalled = 0

    def __call__(self, info: RequestInfo) -> Fault | None:
        if info.kind is not Kind.DATA_GET:
            return None
        shape = self.shape
        with self._lock:
            # Always two draws per request, whatever the shape: the same seed then gives the
            # same stall decisions whether or not the delay parameters change.
            u_stall, u_delay = self._rng.random(), self._rng.random()
            stall = u_stall < shape.stall_fraction
            self.shaped += 1
            self.stalled += int(stall)
        trickle, extra = shape.pacing(range_length(info.headers))
        delay = shape.first_byte_s(u_delay) + extra + (shape.stall_seconds if stall else 0.0)
        if delay == 0 and trickle is None:
            return None
        return Fault(stall=delay or None, trickle=trickle)


def link_hook(shape: LinkShape) -> LinkHook:
    """A FaultHook shaping DATA_GET responses as ``shape`` says (see the module docstring)."""
    return LinkHook(shape)


__all__ = ["FaultHook", "LinkHook", "LinkShape", "link_hook", "range_length"]
