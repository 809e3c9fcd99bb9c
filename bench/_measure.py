"""What the load benchmark measures: time, CPU, memory, and bytes on the wire over time."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Self

import psutil


@dataclasses.dataclass
class Sample:
    """One measured run of one contender."""

    seconds: float
    bytes: int
    cpu_s: float  # the reader's CPU
    server_cpu_s: float  # SeaweedFS's CPU over the same window
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: (seconds since the run's start, GB/s) over the run, see LinkRate.
    rate: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def cpu_per_gb(self) -> float:
        return self.cpu_s / (self.bytes / 1e9)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gbps": self.gbps}


def cpu_split(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds of a process tree, and its minor page faults."""
    proc = psutil.Process(pid)
    user = system = 0.0
    faults = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, OSError):
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
            # Field 10 of /proc/PID/stat (minflt); the name before ")" may hold spaces.
            faults += int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    return user, system, faults


def tree_cpu(pid: int) -> float:
    user, system, _ = cpu_split(pid)
    return user + system


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _Sampler(threading.Thread):
    """Calls ``sample`` every ``period`` seconds until the ``with`` block ends."""

    period = 0.02

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._done = threading.Event()

    def sample(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._done.wait(self.period):
            with contextlib.suppress(OSError):
                self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
        self.sample()


class PeakMemory(_Sampler):
    """Peak RssAnon / VmRSS / RssShmem (KiB) of one process, sampled every 20 ms."""

    FIELDS = ("RssAnon", "VmRSS", "RssShmem")

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.path = Path(f"/proc/{pid}/status")
        self.peak = dict.fromkeys(self.FIELDS, 0)

    def sample(self) -> None:
        for line in self.path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]))


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


class LinkRate(_Sampler):
    """Bytes received on loopback every 50 ms: the same yardstick for every contender.

    SeaweedFS moves each byte over loopback twice (volume server -> S3 gateway -> reader),
    so ``series`` scales the counts to make their sum the bytes the run read.
    """

    period = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[float, int]] = []

    def sample(self) -> None:
        self.points.append((time.monotonic(), loopback_bytes()))

    def series(self, start: float, seconds: float, nbytes: int) -> list[tuple[float, float]]:
        """(seconds since ``start``, GB/s) over [start, start + seconds]."""
        # One sample either side of the window, so its first and last bytes are counted.
        lo, hi = start - self.period, start + seconds + self.period
        inside = [(t, b) for t, b in self.points if lo <= t <= hi]
        if len(inside) < 2:
            return []
        scale = nbytes / max(inside[-1][1] - inside[0][1], 1)
        return [
            (t1 - start, (b1 - b0) * scale / (t1 - t0) / 1e9)
            for (t0, b0), (t1, b1) in itertools.pairwise(inside)
        ]


def summarize(samples: list[Sample]) -> dict[str, float]:
    gbps = [s.gbps for s in samples]
    return {
        "gbps_median": statistics.median(gbps),
        "gbps_min": min(gbps),
        "gbps_max": max(gbps),
        "seconds_median": statistics.median(s.seconds for s in samples),
        "cpu_s_per_gb": statistics.median(s.cpu_per_gb for s in samples),
        "server_cpu_s_per_gb": statistics.median(s.server_cpu_s / (s.bytes / 1e9) for s in samples),
    }


def median_run(samples: list[Sample]) -> Sample:
    return sorted(samples, key=lambda s: s.gbps)[len(samples) // 2]
