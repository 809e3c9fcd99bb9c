"""The systemd unit verifies, and watchdog pings stop when the event loop is blocked."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorferry.daemon import systemd
from tests.conftest import short_dir

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tensorferryd.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_verifies(tmp_path: Path) -> None:
    # The unit names the installed path; point it at this venv's entry point to verify.
    here = Path(sys.executable).with_name("tensorferry")
    unit = tmp_path / "tensorferryd.service"
    unit.write_text(UNIT.read_text().replace("/opt/tensorferry/bin/tensorferry", str(here)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.stderr == ""
    assert "Type=notify" in unit.read_text()
    assert "WatchdogSec=" in unit.read_text()
    # Sealed arenas outlive the daemon: systemd keeps their descriptors, and their files.
    assert "FileDescriptorStoreMax=4096" in unit.read_text()
    assert "RemoveIPC=no" in unit.read_text()
    preserve = UNIT.with_name("fdstore-preserve.conf").read_text()
    assert "[Service]\nFileDescriptorStorePreserve=yes\n" in preserve


def test_watchdog_pings_come_from_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    path = short_dir() / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s

    def drain() -> list[float]:
        seen = []
        while True:
            try:
                if listener.recv(64) == b"WATCHDOG=1":
                    seen.append(time.monotonic())
            except BlockingIOError:
                return seen

    async def scenario() -> tuple[list[float], list[float]]:
        stop = asyncio.Event()
        task = asyncio.create_task(systemd.watchdog(stop))
        await asyncio.sleep(0.35)
        before = drain()
        time.sleep(0.5)  # noqa: ASYNC251 - blocks the loop longer than WatchdogSec / 2, on purpose
        during = drain()
        stop.set()
        await task
        return before, during

    try:
        before, during = asyncio.run(scenario())
    finally:
        listener.close()
    assert len(before) >= 3
    assert during == []
