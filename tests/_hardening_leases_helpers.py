"""Shared by the lease hardening tests: a local model, a daemon allowed to read it, waits."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tensorferry.devtools.modelgen import write_model
from tests.conftest import Daemon, daemon_env, running_daemon


def write_lease_model(local_root: Path) -> str:
    write_model(local_root / "m", 1 << 20, layer_bytes=1 << 19)
    (local_root / "m" / "config.json").write_text("{}")
    # Far more than gRPC's flow-control windows: a reader that stops keeps the call open.
    (local_root / "m" / "blob.bin").write_bytes(b"b" * (64 << 20))
    return str(local_root / "m")


def local_daemon(local_root: Path, limits: str = "") -> contextlib.AbstractContextManager[Daemon]:
    return running_daemon(daemon_env(None), allow=[str(local_root)], extra_config=limits)


def wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    assert check(), "condition not reached in time"  # type: ignore[operator]
