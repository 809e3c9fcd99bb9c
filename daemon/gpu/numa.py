"""Which NUMA node a GPU sits on, and memory first touched there.

A GPU copies from pinned host memory on its own socket at about three times the rate it
reaches across the socket link (gpu-mechanics.md, 3.3: 12.1 against 3.8 GB/s), so a host
whose GPUs hang off different sockets gets one ring per node (``rings``). The node comes from
sysfs by the GPU's PCI bus id (``CudaApi.numa_node``).

The ring's pages are placed by first touch: they are populated by a thread that runs only
on the node's CPUs, and the kernel's default policy allocates a page on the node of the CPU
that faults it in. Unlike ``mbind`` this needs no per-architecture syscall number and no
CAP_SYS_NICE (container seccomp profiles allow ``mbind`` only with it); like
``MPOL_PREFERRED`` a full node falls back to another instead of failing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Each node's ``cpulist``.
NODE_ROOT = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> frozenset[int]:
    """sysfs's CPU list ("0-3,8-11", "" for a node without CPUs) as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def node_cpus(node: int, root: Path = NODE_ROOT) -> frozenset[int]:
    """The CPUs of ``node`` this process may run on (empty: none, or the node is unknown)."""
    try:
        cpus = parse_cpulist((root / f"node{node}" / "cpulist").read_text())
    except (OSError, ValueError):
        return frozenset()
    return cpus & frozenset(os.sched_getaffinity(0))


def on_cpus(cpus: frozenset[int], fn: Callable[[], T]) -> T:
    """``fn()`` in a thread that runs only on ``cpus``; its result or its exception.

    A thread of its own because affinity is per thread on Linux: the caller's (the event
    loop's) stays as it was."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller below
            error.append(exc)

    thread = threading.Thread(target=run, name="numa-first-touch")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
