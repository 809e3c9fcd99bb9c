"""How fast the host's network link is believed to be, for sizing a load's GETs in flight.

A load cannot learn what its link carries without trying, and trying one doubling at a time
costs about a second a step on a far store (``pacing.Pace``). Knowing the link's rate, the
first half second's per-connection throughput says how many GETs the link needs, and the
load goes there in one step. The rate is, in order: ``[s3] target_rate``; the fastest
physical NIC that reports its speed (``/sys/class/net/*/speed``); else ``ASSUMED``, the
default of AWS's CRT S3 client. Virtual NICs (virtio, ENA) often report no speed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

#: Bytes per second assumed when neither the config nor a NIC says: 10 Gb/s.
ASSUMED = 10e9 / 8
SYS_NET = Path("/sys/class/net")


@dataclasses.dataclass(frozen=True)
class LinkRate:
    bps: float  # bytes per second
    source: str  # where the figure came from, for the start-up log and `tensorferry doctor`
    #: Neither the config nor a NIC said (a NIC at exactly 10 Gb/s is no assumption).
    assumed: bool = dataclasses.field(default=False, compare=False)

    def describe(self) -> str:
        return f"{self.bps * 8 / 1e9:.3g} Gb/s ({self.source})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # "Invalid argument" from drivers without a speed, a vanished NIC
        return None


def nic_rate(sys_net: Path = SYS_NET) -> LinkRate | None:
    """The fastest physical NIC that is up and reports a speed, or None."""
    best: LinkRate | None = None
    try:
        nics = sorted(sys_net.iterdir())
    except OSError:
        return None
    for nic in nics:
        # Loopback, bridges, veth, ifb: no ``device`` link; they carry no store traffic
        # of their own.
        if not (nic / "device").exists() or _read(nic / "operstate") not in ("up", "unknown"):
            continue
        speed = _read(nic / "speed")  # Mb/s; -1 or unreadable when the driver does not say
        if speed is None or not speed.lstrip("-").isdigit() or int(speed) <= 0:
            continue
        rate = LinkRate(int(speed) * 1e6 / 8, f"{nic.name}'s reported speed")
        if best is None or rate.bps > best.bps:
            best = rate
    return best


def link_rate(target_rate: int, sys_net: Path = SYS_NET) -> LinkRate:
    """What a load sizes its GETs in flight for (``target_rate`` from ``[s3]``, 0 if unset)."""
    if target_rate > 0:
        return LinkRate(float(target_rate), "[s3] target_rate")
    return nic_rate(sys_net) or LinkRate(
        ASSUMED, "assumed: no NIC reports its speed; [s3] target_rate sets it", assumed=True
    )
