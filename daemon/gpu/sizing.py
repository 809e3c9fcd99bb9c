"""How many slots a pinned ring has: as many range GETs as the link needs, plus the copies.

A slot is busy from its range GET's request until the copy engine has copied it: with
``PER_CONNECTION`` bytes per second per connection, one range of ``slot_size`` bytes holds
its slot ``slot_size / PER_CONNECTION`` seconds, and the link's rate needs
``link x that time / slot_size`` of them at once (Little's law; the slot size cancels out:
the link's rate over one connection's). A fixed 48 x 8 MiB carried about 4.3 GB/s from S3;
a 100 Gb/s NIC needs 139 GETs in flight.
"""

from __future__ import annotations

import dataclasses
import math

from tensorferry.daemon.fetch.link import LinkRate
from tensorferry.daemon.gpu.settings import CudaSettings

#: Bytes per second one S3 connection delivers for a multi-MiB ranged GET: AWS's guidance
#: and our own measurements put a connection at 85-90 MB/s (pacing.py). A faster store
#: (a nearby S3-compatible one) needs fewer slots, and pacing grows the GETs to what the
#: link carries within the ring.
PER_CONNECTION = 90e6
#: Slots the copy engine holds per copy stream: the one being copied and the next queued
#: behind it, so a stream never waits for the event loop to hand it a slot.
PER_STREAM = 2
MIN_SLOTS, MAX_SLOTS = 16, 1024
#: When no NIC reports its speed (ENA, virtio: common on GPU clouds) the link is assumed at
#: 10 Gb/s, but a GPU host's real link is likely faster: never fewer than the old fixed 48.
ASSUMED_FLOOR = 48
#: Without ``[cuda] ring_bytes``, all rings together pin at most MemTotal / this: pinned
#: memory cannot swap, and the host's workers need the rest.
MEM_SHARE = 16


@dataclasses.dataclass(frozen=True)
class RingSize:
    slots: int  # per ring
    why: str  # for the start-up log and Status


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def ring_size(
    settings: CudaSettings, slot_size: int, link: LinkRate, rings: int, total_memory: int
) -> RingSize:
    """Slots per ring for ``rings`` rings (one per NUMA node with GPUs)."""
    if settings.ring_slots:
        return RingSize(settings.ring_slots, "[cuda] ring_slots")
    range_seconds = slot_size / PER_CONNECTION
    # The epsilon keeps a rate that is an exact multiple from rounding up a whole slot.
    gets = math.ceil(link.bps * range_seconds / slot_size - 1e-9)
    copies = PER_STREAM * settings.copy_streams
    want = min(max(gets + copies, MIN_SLOTS), MAX_SLOTS)
    why = (f"auto: {gets} GETs in flight for {link.describe()} at {PER_CONNECTION / 1e6:.0f} "
           f"MB/s each + {copies} for the copy streams")  # fmt: skip
    if link.assumed and want < ASSUMED_FLOOR:
        want = ASSUMED_FLOOR
        why += f", at least {ASSUMED_FLOOR} while the link is assumed"
    cap = settings.ring_bytes or total_memory // MEM_SHARE
    fits = cap // (slot_size * rings)
    if cap and fits < want:  # cap 0: MemTotal unreadable, nothing to go by
        where = "[cuda] ring_bytes" if settings.ring_bytes else f"MemTotal / {MEM_SHARE}"
        want = max(2, fits)
        why += f"; capped by {where} ({cap >> 20} MiB for {rings} ring(s))"
    return RingSize(want, why)
