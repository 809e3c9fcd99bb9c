"""The fleet model's inputs: ``Params`` (every ``fleet_sim.py`` flag) and ``Link``, one
link's per-range latency with the daemon's hedging folded in.

Defaults and their sources (docs/fleet.md has the table): S3's documented 5,500 GET/s per
prefix and ~85-90 MB/s per connection; a first byte of 20-60 ms with a tail, as the
S3-like link of ``devtools/s3link.py`` draws it; the daemon's own ``[s3] concurrency`` and
``max_concurrency``. Cache-tier and P2P figures are assumptions to vary, not measurements.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorferry.daemon.config.keys import default
from tensorferry.daemon.fetch.hedging import MIN_HEDGE_SECONDS, SLOW
from tensorferry.daemon.fetch.pacing import INTERVAL
from tensorferry.devtools.s3link import LinkShape

Floats = npt.NDArray[np.float64]
_Z99 = NormalDist().inv_cdf(0.99)
#: Draws per link for its latency distribution (a fixed sample, so every run agrees).
_DRAWS = 20_000


def _field(value: Any, help: str) -> Any:
    return dataclasses.field(default=value, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Params:
    """The fleet's inputs; each is a ``fleet_sim.py`` flag (``--model-gb`` ...)."""

    model_gb: float = _field(140.0, "model size, GB (1e9 bytes)")
    range_mib: int = _field(8, "range GET size, MiB (the daemon's)")
    prefix_rate: float = _field(5500.0, "GET/s S3 admits per prefix before 503 SlowDown")
    prefixes: int = _field(1, "S3 prefixes (partitions) the model's objects spread over")
    s3_link: str = _field(
        "first_byte_ms=30,tail_ms=60,rate_mbps=90,stall_fraction=0.005,stall_seconds=2",
        "S3 per connection, LinkShape keys (devtools/s3link.py)",
    )
    nic_gbps: float = _field(200.0, "per-host NIC, Gb/s")
    link_gbps: float = _field(
        0.0, "the link rate the daemon sizes its first step for, Gb/s (0: the NIC's)"
    )
    concurrency: int = _field(default("s3.concurrency"), "GETs in flight at a load's start")
    max_concurrency: int = _field(default("s3.max_concurrency"), "GETs in flight, at most")
    start_spread_s: float = _field(0.0, "hosts start uniformly within this many seconds")
    cache_nodes: int = _field(8, "cache tier nodes")
    cache_node_gbps: float = _field(25.0, "GB/s each cache node serves")
    cache_link: str = _field("first_byte_ms=2,tail_ms=8,rate_mbps=1000", "cache, per conn.")
    cache_fill_conns: int = _field(256, "GETs in flight the cache fills from S3 with")
    seeds: int = _field(3, "P2P seed peers (they fetch from S3)")
    seed_conns: int = _field(128, "GETs in flight per seed peer to S3")
    peer_serve: float = _field(0.5, "share of its NIC a peer re-serves pieces at")
    p2p_link: str = _field("first_byte_ms=5,tail_ms=20,rate_mbps=500", "P2P, per connection")
    dt: float = _field(INTERVAL / 4, "seconds per step of the fluid (divides 0.5)")
    max_sim_s: float = _field(6 * 3600.0, "give up past this much simulated time")

    def __post_init__(self) -> None:
        steps = INTERVAL / self.dt
        if not (self.dt > 0 and abs(steps - round(steps)) < 1e-9):
            raise ValueError(f"dt must divide the controller's {INTERVAL} s, got {self.dt!r}")
        for name in ("model_gb", "prefix_rate", "nic_gbps", "cache_node_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("range_mib", "prefixes", "concurrency", "cache_nodes", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.peer_serve <= 1:
            raise ValueError(f"peer_serve must be in [0, 1], got {self.peer_serve!r}")

    @property
    def model_bytes(self) -> float:
        return self.model_gb * 1e9

    @property
    def range_bytes(self) -> float:
        return float(self.range_mib << 20)


@dataclasses.dataclass(frozen=True)
class Link:
    """A link's per-range latency, hedging included: its mean enters every rate, and the
    slowest of a load's last window of draws the end of the load."""

    conn_bps: float
    lat_mean: float
    lat_sd: float
    hedged: float  # share of ranges asked for twice
    draws: Floats

    @classmethod
    def of(cls, text: str, range_bytes: float) -> Link:
        shape = LinkShape.parse(text)
        rng = np.random.default_rng(shape.seed)
        # The same lognormal as s3link's hook: median first_byte_ms, p99 + tail_ms.
        sigma = math.log1p(shape.tail_ms / shape.first_byte_ms) if shape.first_byte_ms else 0.0
        lat = shape.first_byte_ms / 1e3 * np.exp(sigma / _Z99 * rng.standard_normal(_DRAWS))
        lat += shape.stall_seconds * (rng.random(_DRAWS) < shape.stall_fraction)
        conn_bps = shape.rate_mbps * 1e6
        took = lat + range_bytes / conn_bps
        hedge_at = max(MIN_HEDGE_SECONDS, SLOW * float(np.quantile(took, 0.9)))
        # A hedged range ends a fresh request after the hedge: at hedge_at + a median one.
        eff = np.where(took > hedge_at, hedge_at + float(np.median(lat)), lat)
        hedged = float((took > hedge_at).mean())
        return cls(conn_bps, float(eff.mean()), float(eff.std()), hedged, eff)
