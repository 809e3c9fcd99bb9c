"""Prometheus metrics on a loopback-only HTTP listener, separate from the gRPC socket.

Counters and histograms are fed from the load records the registry keeps; gauges (resident
bytes, leases, recycled bytes) are read from the registry at scrape time, so they can
never drift from the truth.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tensorferry.v1 import tensorferry_pb2 as pb

if TYPE_CHECKING:
    from tensorferry.daemon.records import LoadRecord
    from tensorferry.daemon.registry import Registry

log = logging.getLogger(__name__)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def source_label(uri: str) -> str:
    """Per source, but bounded: the bucket for S3, "local" for directories."""
    return "s3://" + uri[5:].split("/", 1)[0] if uri.startswith("s3://") else "local"


class _Live(Collector):
    def __init__(self, registry: Registry, workers: Callable[[], list[pb.FetchWorker]]) -> None:
        self.registry = registry
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        models = self.registry.models
        resident = GaugeMetricFamily(
            "tensorferry_resident_bytes",
            "Resident arenas",
            labels=["device", "tier"],
        )
        by_device: dict[str, int] = {}
        for m in models:
            if m.loaded is not None:
                by_device[m.key.device] = by_device.get(m.key.device, 0) + m.loaded.arena.size
        for device, size in sorted(by_device.items()):
            resident.add_metric([device, "shm" if device == "cpu" else "gpu"], size)
        resident.add_metric(["cpu", "recycled"], self.registry.sink.recycled_bytes)
        yield resident
        leases = GaugeMetricFamily("tensorferry_leases", "Open worker leases")
        leases.add_metric([], sum(len(m.leases) for m in models))
        yield leases
        adopted = [m.loaded.arena.size for m in models if m.adopted and m.loaded is not None]
        yield GaugeMetricFamily(
            "tensorferry_adopted_models", "Resident models adopted at start from the daemon "
            "before (nothing fetched)", value=len(adopted),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "tensorferry_adopted_bytes", "Bytes of the adopted models' arenas", value=sum(adopted)
        )
        loaded = GaugeMetricFamily("tensorferry_models", "Models by state", labels=["state"])
        for state in ("loading", "ready", "evicting"):
            loaded.add_metric([state], sum(1 for m in models if m.state.value == state))
        yield loaded
        ring = GaugeMetricFamily(
            "tensorferry_ring_slots", "Pinned ring slots (GPU hosts)", labels=["state"]
        )
        if self.registry.cuda is not None:
            r = self.registry.cuda.rings  # all NUMA nodes' rings together
            ring.add_metric(["busy"], r.slots - r.free)
            ring.add_metric(["free"], r.free)
        yield ring
        yield from _worker_metrics(self.workers())


def _worker_metrics(workers: list[pb.FetchWorker]) -> Iterator[CounterMetricFamily]:
    """Per fetch worker ([fetch] workers): what it carried and what it cost."""
    for name, doc in (
        ("bytes", "Range bytes landed by each fetch worker"),
        ("gets", "Range GETs completed by each fetch worker"),
        ("cpu_seconds", "CPU seconds of each fetch worker"),
    ):
        family = CounterMetricFamily(f"tensorferry_fetch_worker_{name}", doc, labels=["worker"])
        for w in workers:
            family.add_metric([str(w.index)], float(getattr(w, name)))
        yield family


class Metrics:
    def __init__(
        self, registry: Registry, workers: Callable[[], list[pb.FetchWorker]] = list
    ) -> None:
        self.prometheus = CollectorRegistry()
        r = self.prometheus
        self.bytes = Counter("tensorferry_fetched_bytes", "Bytes fetched", ["source"], registry=r)
        self.loads = Counter("tensorferry_loads", "Loads by outcome", ["outcome"], registry=r)
        self.retries = Counter("tensorferry_retries", "Retries by cause", ["cause"], registry=r)
        self.hedges = Counter("tensorferry_hedges", "Hedged range GETs", registry=r)
        self.proxy_fallbacks = Counter(
            "tensorferry_proxy_fallbacks",
            "Range GETs asked of the store directly after the proxy failed them",
            registry=r,
        )
        self.ready = Histogram(
            "tensorferry_time_to_ready_seconds", "From request to ready", ["kind"],
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.get_seconds = Histogram(
            "tensorferry_range_get_seconds", "One range GET, first byte to last",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        r.register(_Live(registry, workers))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe(self, record: LoadRecord) -> None:
        self.loads.labels(record.outcome).inc()
        if record.outcome in ("ready", "attached"):
            kind = "cold" if record.outcome == "ready" else "attach"
            self.ready.labels(kind).observe(record.total_seconds)
        if record.bytes:
            self.bytes.labels(source_label(record.uri)).inc(record.bytes)
        for cause, n in record.retry_causes:
            self.retries.labels(cause).inc(n)
        if record.hedges:
            self.hedges.inc(record.hedges)

    def serve(self, listen: str) -> int:
        """Start the listener (config checked it is loopback); returns the bound port."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self._server, self._thread = start_http_server(int(port), host, registry=self.prometheus)
        bound = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
