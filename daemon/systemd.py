"""sd_notify without libsystemd: READY=1, WATCHDOG=1, STOPPING=1. A no-op outside systemd.

The watchdog is pinged from a task on the daemon's own event loop, so a wedged loop stops
the pings and systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from tensorferry import env


def notify(state: str) -> bool:
    """Send one state line to $NOTIFY_SOCKET; False when not run by systemd."""
    address = env.notify_socket()
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    with sock, contextlib.suppress(OSError):
        sock.sendto(state.encode(), address)
        return True
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
