"""The fleet model: N hosts scaling out together, each loading the same model (issue #19).

What is modelled, per host: the daemon's range GETs as a fluid. A host with ``c`` GETs in
flight on a link with first-byte latency ``lat`` and ``r`` bytes/s per connection moves
``c * S / (lat + S / min(r, nic / c))`` bytes/s (S = the range size). ``c`` is the daemon's
own pacing controller, ``tensorferry.daemon.fetch.pacing.Pace`` itself, sampled every INTERVAL
from the host's bytes and 503s: 32 in flight, a jump at the first sample to what the NIC
(``link_gbps``) needs, else doubled while a step brings >= 30 % more, up to 256 (or fewer
when fewer ranges remain); halved by SlowDowns. Latency is the S3-like link of
``devtools/s3link.py`` (lognormal first byte, a share of stalled responses), with
stragglers hedged as ``hedging.Hedger`` does (past max(0.5 s, 4 x p90) a range is asked
again): the mean of that enters the rate, and the slowest of the last window of ranges
enters the end of each load.

The origin: one S3 prefix (or ``prefixes``) admits ``prefix_rate`` GETs/s (a token bucket
one second deep); the rest are answered 503 SlowDown. Each origin client keeps the daemon's
per-bucket back-off (``daemon/store/throttle.py``): a 503 doubles the pause (0.2-5 s,
jittered half-to-full), a success halves it, a paused host starts no GET, and when the pause
ends its whole window goes out at once. A host keeps starting GETs until its first 503
comes back. A host whose 503s exceed the daemon's retry budget (16 + ranges / 8) counts in
``failed_loads``: the real daemon would have failed that load.
Scenarios: ``direct`` (every host reads S3), ``cache`` (a cache tier with its own aggregate
bandwidth, filled once from S3 with ``cache_fill_conns`` GETs in flight, read through: a
host never runs ahead of the fill) and ``p2p`` (``seeds`` seed peers split the model's
ranges from S3; every peer that holds bytes re-serves them at ``peer_serve`` of its NIC,
seeds at full line rate).

The grain: SimPy processes, not one event per range (1,000 hosts x 17,000 ranges would be
17 M events). One ``links`` process steps every ``dt`` (0.125 s): inside a step rates are
constant and GET counts are computed (503s drawn from a Poisson); one process per host runs
the pacing controller on those steps and, on its host's completion event, adds the end of
the load (the window emptying, and its slowest range). Error of the grain, measured by
halving and doubling ``dt``: rows that stay under the prefix's rate move by under 0.5 s.
Rows that overrun it are not converged: their times fall between the floor (hosts x ranges
/ prefix rate, which they never beat) and about twice it, their 503 counts vary by up to
2x, and only their verdict is robust (every load over its retry budget). One host through
the S3-like link of docs/performance.md lands within 6 % of the daemon's measured times
(``fleet_sim.py`` prints that check first).

Not modelled: S3's own partition scaling of a hot prefix (minutes; ``prefixes`` stands in),
TCP slow start, CPU and PCIe limits on the host, cache-tier misses after eviction, piece
rarity and topology in the swarm (any held byte can be served to anyone), and what a load
that ran out of retries costs: it counts in ``failed_loads`` and the model carries on as if
it had not failed, so such rows are optimistic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator
from typing import Any

import numpy as np
import numpy.typing as npt
import simpy
from _fleet_inputs import Floats, Link, Params

from tensorferry.daemon.config.keys import default
from tensorferry.daemon.fetch.pacing import INTERVAL, Pace
from tensorferry.daemon.store.throttle import MAX_PAUSE, MIN_PAUSE

SCENARIOS = ("direct", "cache", "p2p")
#: Seconds of the prefix's request rate that may be spent at once (an assumption: S3
#: documents a rate per second, not how it measures it).
BURST_S = 1.0


@dataclasses.dataclass
class Outcome:
    scenario: str
    hosts: int
    ready: Floats  # seconds from each host's start to its model being resident
    origin_gets: float
    origin_bytes: float
    slowdowns: int
    failed_loads: int
    workers: float  # median GETs in flight the hosts' controllers settled on
    sim_s: float


class Fleet:
    """One scenario at one host count. Nodes 0..hosts-1 are the hosts, the rest the tier's
    origin readers (cache fillers or seed peers), which hold ``cache_fill_conns`` or
    ``seed_conns`` GETs in flight without pacing."""

    def __init__(self, p: Params, scenario: str, hosts: int, seed: int = 1) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
        self.p, self.scenario, self.hosts = p, scenario, hosts
        self.rng = np.random.default_rng(seed)
        self.env = simpy.Environment()
        S, model = p.range_bytes, p.model_bytes
        fill = {"direct": 0, "cache": p.cache_nodes, "p2p": p.seeds}[scenario]
        fill_conns = p.cache_fill_conns / p.cache_nodes if scenario == "cache" else p.seed_conns
        n = hosts + fill
        self.origin = Link.of(p.s3_link, S)
        tier = Link.of(p.cache_link if scenario == "cache" else p.p2p_link, S)
        host_link = self.origin if scenario == "direct" else tier
        self.reads_origin = np.arange(n) >= (0 if scenario == "direct" else hosts)
        self.target = np.where(np.arange(n) < hosts, model, model / max(fill, 1))
        self.ranges = np.ceil(self.target / S)
        self.w = np.where(np.arange(n) < hosts, float(p.concurrency), fill_conns)
        self.lat = np.where(self.reads_origin, self.origin.lat_mean, host_link.lat_mean)
        self.conn_bps = np.where(self.reads_origin, self.origin.conn_bps, host_link.conn_bps)
        self.host_link, self.nic = host_link, p.nic_gbps * 1e9 / 8
        spread = self.rng.uniform(0, p.start_spread_s, n) * (np.arange(n) < hosts)
        self.start = np.round(spread / p.dt) * p.dt
        self.flowing = self.start + self.lat  # bytes flow from the first byte on
        self.x, self.pause, self.delay = np.zeros(n), np.zeros(n), np.zeros(n)
        self.n503 = np.zeros(n)
        self.tokens = p.prefix_rate * p.prefixes * BURST_S
        self.done_at, self.ready = np.full(n, np.nan), np.full(hosts, np.nan)
        self.done = [self.env.event() for _ in range(hosts)]
        self.tick = self.env.event()
        self.env.process(self._links())
        for i in range(hosts):
            self.env.process(self._host(i))

    def run(self) -> Outcome:
        self.env.run()
        if np.isnan(self.ready).any():
            raise RuntimeError(f"{self.scenario}, {self.hosts} hosts: not done by max_sim_s")
        budget = default("s3.retry_budget") + self.ranges // 8
        failed = self.n503 > budget
        org = self.reads_origin
        # Every range is one GET, plus a hedge for the stragglers; 503s are counted apart.
        gets = float(self.ranges[org].sum()) * (1.0 + self.origin.hedged)
        return Outcome(
            self.scenario, self.hosts, self.ready, gets, float(self.x[org].sum()),
            int(self.n503.sum()), int(failed[: self.hosts].sum()),
            float(np.median(self.w[: self.hosts])), float(self.env.now),
        )  # fmt: skip

    def _host(self, i: int) -> Generator[simpy.Event, Any, None]:
        """The daemon's controller for host i, then the end of its load."""
        p, ranges = self.p, int(self.ranges[i])
        yield self.env.timeout(self.start[i])
        link_bps = (p.link_gbps or p.nic_gbps) * 1e9 / 8
        pace = Pace(
            min(p.concurrency, ranges), min(max(p.max_concurrency, p.concurrency), ranges),
            link_bps=link_bps, started=self.env.now,
        )  # fmt: skip
        steps = round(INTERVAL / p.dt)
        # A settled pace still sheds on SlowDowns: sampled while there are some to shed and
        # the host reads the origin (a tier answers no 503s).
        while not self.done[i].triggered and not (
            pace.settled and (pace.workers <= pace.start or not self.reads_origin[i])
        ):
            for _ in range(steps):
                yield self.tick | self.done[i]
            if not self.done[i].triggered:
                self.w[i] = pace.sample(int(self.x[i]), self.env.now, int(self.n503[i]))
        yield self.done[i]
        # The fluid runs at full rate to the end. A window whose ranges end at scattered
        # times empties over one range time instead (half of it more, on average); ranges
        # started together stay in step for as many rounds as latency jitter takes to
        # scatter them. Then the slowest of the last window's ranges.
        c = int(min(self.w[i], ranges))
        link = self.host_link
        took = link.lat_mean + self.p.range_bytes / min(link.conn_bps, self.nic / c)
        scattered = min(took, link.lat_sd * math.sqrt(ranges / c))
        last = float(self.rng.choice(link.draws, c).max()) - link.lat_mean
        self.ready[i] = self.done_at[i] + 0.5 * scattered + last - self.start[i]

    def _links(self) -> Generator[simpy.Event, Any, None]:
        dt = self.p.dt
        while np.isnan(self.done_at).any():
            if self.env.now > self.p.max_sim_s:
                return
            yield self.env.timeout(dt)
            self._step(self.env.now - dt, dt)
            tick, self.tick = self.tick, self.env.event()
            tick.succeed()

    def _step(self, t0: float, dt: float) -> None:
        S, t1 = self.p.range_bytes, t0 + dt
        live = np.isnan(self.done_at) & (self.flowing < t1)
        active = np.clip((t1 - np.maximum(self.flowing, self.pause)) / dt, 0.0, 1.0) * live
        rem = self.target - self.x
        # The window stays full until the last range starts; _host adds how it empties.
        c = np.minimum(self.w, self.ranges)
        per_conn = np.minimum(self.conn_bps, self.nic / c)
        want = c * S / (self.lat + S / per_conn) * active * dt
        got = want.copy()
        org = self.reads_origin & live & (active > 0)
        if org.any():
            self._admit(org, want, got, c, active, t1, dt)
        tier = live & ~self.reads_origin
        if tier.any():
            self._serve(tier, got, dt)
        got = np.minimum(got, np.maximum(rem, 0.0))
        fin = live & (got >= rem - 0.5)
        share = np.divide(rem, got, out=np.ones_like(rem), where=got > 0)
        self.done_at[fin] = (t1 - active * dt * (1.0 - share))[fin]
        self.x += got
        for i in np.flatnonzero(fin[: self.hosts]):
            self.done[i].succeed()

    def _admit(
        self, org: npt.NDArray[np.bool_], want: Floats, got: Floats, c: Floats,
        active: Floats, t1: float, dt: float,
    ) -> None:  # fmt: skip
        """The prefix's request limit over this step, and each origin client's back-off."""
        S, rate = self.p.range_bytes, self.p.prefix_rate * self.p.prefixes
        # A token bucket one second deep: S3 states its limit per second, not per step.
        self.tokens = cap = min(rate * BURST_S, self.tokens + rate * dt)
        req = want[org] / S
        # Workers held by a pause (or a load's start) all send at once when it ends: a
        # whole window in one burst, however short the step.
        began = t1 - active[org] * dt
        resumed = (began > t1 - dt) & (began > self.flowing[org] - 1e-9)
        req = np.where(resumed, np.maximum(req, c[org]), req)
        f, busy = min(1.0, cap / req.sum()), active[org] * dt
        if f < 1.0:
            # GETs keep starting until the first 503 is back: those before it (1 / share
            # refused), the window in flight, and a first byte's worth at the host's rate.
            # Fewer sent means fewer refused: bisect for the share admitted that fits.
            before = c[org] + req / busy * self.lat[org]
            lo, hi = 0.0, 1.0
            for _ in range(14):
                f = (lo + hi) / 2
                sent = np.minimum(req, 1.0 / (1.0 - f) + before)
                lo, hi = (f, hi) if f * sent.sum() < cap else (lo, f)
            f = lo
            sent = np.minimum(req, 1.0 / (1.0 - f) + before)
            busy = busy * sent / req
            req = sent
        ok = req * f
        self.tokens -= float(ok.sum())
        bad = self.rng.poisson(req * (1.0 - f)).astype(np.float64)
        got[org] = np.minimum(ok * S, want[org])  # a burst is GETs sent, not bytes yet
        self.n503[org] += bad
        delay, hit = self.delay[org], bad > 0
        up = np.maximum(delay, MIN_PAUSE) * np.exp2(np.clip(bad - ok, -30.0, 30.0))
        down = delay * np.exp2(-np.minimum(ok, 30.0))
        new = np.where(hit, np.clip(up, MIN_PAUSE, MAX_PAUSE), np.where(down < MIN_PAUSE, 0, down))
        self.delay[org] = new
        # Half to all of the delay, from when this step's GETs stopped (throttle.slow_down).
        paused = t1 - active[org] * dt + busy + self.rng.uniform(new / 2, new)
        self.pause[org] = np.where(hit, np.maximum(self.pause[org], paused), self.pause[org])

    def _serve(self, tier: npt.NDArray[np.bool_], got: Floats, dt: float) -> None:
        """The tier's capacity shared in proportion to what each host can take: no host
        reads bytes the tier does not hold yet (the cache fill, the seeds' fetch)."""
        held = float(self.x[self.reads_origin].sum())
        wants = np.minimum(got[tier], np.maximum(held - self.x[tier], 0.0))
        if self.scenario == "cache":
            capacity = self.p.cache_nodes * self.p.cache_node_gbps * 1e9
        else:
            seeds = np.count_nonzero(self.x[self.hosts :] > 0)
            peers = np.count_nonzero(self.x[: self.hosts] > 0)
            capacity = (seeds + self.p.peer_serve * peers) * self.nic
        total = float(wants.sum())
        got[tier] = wants * min(1.0, capacity * dt / total) if total > 0 else 0.0
