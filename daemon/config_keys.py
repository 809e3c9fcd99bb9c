"""The keys a config file may use. A misspelt key is refused at start, not ignored: an
ignored `shm_budgte` would leave the host unprotected without a word."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

KEYS: dict[str, set[str]] = {
    "": {"socket", "socket_mode", "socket_group", "preload", "shutdown_grace", "log_level",
         "log_format", "sources", "s3", "memory", "limits", "tcp", "metrics", "cache", "cuda"},
    "sources": {"allow", "allow_any"},
    "s3": {"endpoint_url", "region", "profile", "addressing_style", "concurrency", "chunk_size",
           "read_timeout", "connect_timeout", "attempts", "retry_budget", "range_deadline"},
    "memory": {"shm_budget", "recycle"},
    "limits": {"max_model_bytes", "max_concurrent_loads", "max_loads_per_client",
               "max_concurrent_rpcs", "max_request_bytes", "max_tensors", "max_leases",
               "max_control_calls", "max_transfer_calls"},
    "tcp": {"listen", "cert", "key", "client_ca"},
    "metrics": {"listen"},
    "cache": {"dir", "budget"},
    "cuda": {"api", "ring_slots", "slot_size", "copy_streams", "reserve", "fake_devices",
             "fake_jitter"},
}  # fmt: skip


def unknown_key(data: dict[str, Any], path: Path) -> str | None:
    """A message naming the first unknown key of ``data`` (read from ``path``), or None."""
    for section, allowed in KEYS.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, dict):
            continue
        for key in table:
            if key not in allowed:
                name = f"{section}.{key}" if section else key
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"[{section}]" if section else "the top level"
                return f"config file {path}: unknown key {name!r} in {where}{hint}"
    return None
