"""sd_notify without libsystemd: READY=1, WATCHDOG=1, STOPPING=1, and the file-descriptor
store (FDSTORE=1, FDSTOREREMOVE=1, LISTEN_FDS). A no-op outside systemd.

The watchdog is pinged from a task on the daemon's own event loop, so a wedged loop stops
the pings and systemd restarts the daemon. The descriptor store keeps each sealed arena's
descriptor while the daemon is down (crash, restart, upgrade), and hands it back at the next
start: see sd_pid_notify_with_fds(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence

from tensorferry import env

log = logging.getLogger(__name__)
#: The first descriptor passed with LISTEN_FDS (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: systemd's limit on a descriptor's name (FDNAME_MAX).
FDNAME_MAX = 255
#: A full notify socket blocks the sender; never wedge the event loop on it for longer.
SEND_TIMEOUT = 5.0


def _send(state: str, fds: Sequence[int] = ()) -> bool:
    address = env.notify_socket()
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.settimeout(SEND_TIMEOUT)
    with sock:
        if fds:
            # Not socket.send_fds: it ignores its flags and address (CPython 3.11).
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
            sock.sendmsg([state.encode()], [rights], 0, address)
        else:
            sock.sendto(state.encode(), address)
    return True


def notify(state: str) -> bool:
    """Send one state line to $NOTIFY_SOCKET; False when not run by systemd."""
    with contextlib.suppress(OSError):
        return _send(state)
    return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, if systemd asked this process for pings."""
    usec = env.watchdog_usec()
    pid = env.watchdog_pid()
    if usec is None or (pid is not None and pid != os.getpid()):
        return None
    return usec / 1e6 / 2


async def watchdog(stop: asyncio.Event) -> None:
    interval = watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def listen_fds() -> dict[str, list[int]]:
    """The descriptors systemd passed to this process, by name (sd_listen_fds_with_names).

    Empty unless $LISTEN_PID is this process. The LISTEN_* variables are unset either way,
    so processes started later do not take them for theirs, and the descriptors are made
    close-on-exec for the same reason.
    """
    pid, count, names = env.listen_fds()
    env.forget_listen_fds()
    if pid != os.getpid() or not count:
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
    split = names.split(":") if names is not None else []
    if len(split) != count:
        if names is not None:
            log.warning(
                "LISTEN_FDNAMES names %d descriptors but LISTEN_FDS passes %d: "
                "treating them all as unnamed", len(split), count,
            )  # fmt: skip
        split = ["unknown"] * count
    found: dict[str, list[int]] = {}
    for fd, name in zip(fds, split, strict=True):
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:  # not open: a mistaken LISTEN_FDS
            log.warning("systemd passed descriptor %d (%s) but it is not open: %s", fd, name, exc)
            continue
        found.setdefault(name, []).append(fd)
    return found


def check_fdname(name: str) -> None:
    """ValueError unless systemd accepts ``name`` as FDNAME (fdname_is_valid): printable
    ASCII without ':' (the LISTEN_FDNAMES separator), 1 to 255 characters."""
    if not name or len(name) > FDNAME_MAX:
        raise ValueError(f"a descriptor name needs 1 to {FDNAME_MAX} characters: {name!r}")
    if any(not " " <= c <= "~" or c == ":" for c in name):
        raise ValueError(
            f"a descriptor name may hold printable ASCII characters other than ':': {name!r}"
        )


class FdStore:
    """systemd's file-descriptor store (FileDescriptorStoreMax= in the unit).

    ``store``/``remove`` are no-ops returning False outside systemd (no $NOTIFY_SOCKET) or
    when disabled; a failure to send is logged, never raised: the store is an optimisation,
    the sealed manifest on /dev/shm is what adoption relies on.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = env.notify_socket() is not None if enabled is None else enabled
        self._taken = False

    def store(self, name: str, fd: int) -> bool:
        """Hand systemd a copy of ``fd`` under ``name`` (FDSTORE=1, FDNAME=)."""
        check_fdname(name)
        return self._notify(f"FDSTORE=1\nFDNAME={name}", [fd], name)

    def remove(self, name: str) -> bool:
        """Have systemd close every descriptor it keeps under ``name`` (FDSTOREREMOVE=1)."""
        check_fdname(name)
        return self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}", [], name)

    def take(self) -> dict[str, int]:
        """The descriptors systemd kept, by name: the first of each name (extra ones are
        closed). Only the first call takes them; later calls return {}."""
        if self._taken:
            return {}
        self._taken = True
        taken: dict[str, int] = {}
        for name, fds in listen_fds().items():
            taken[name] = fds[0]
            for extra in fds[1:]:
                os.close(extra)
        return taken

    def _notify(self, state: str, fds: list[int], name: str) -> bool:
        if not self.enabled:
            return False
        try:
            return _send(state, fds)
        except OSError as exc:
            what = state.split("=", 1)[0]
            log.warning("could not send %s for %s to systemd: %s", what, name, exc)
            return False
