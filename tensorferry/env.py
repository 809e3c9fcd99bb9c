"""The one place that reads tensorferry's environment variables.

Each variable is documented here; nothing else in the package calls ``os.environ`` for our
own settings. AWS variables are left to botocore's standard credential and config chain,
except ``AWS_ENDPOINT_URL``, which the daemon's config reads to print where it fetches from.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SOCKET = Path("/run/tensorferry/tensorferry.sock")

#: Unix socket of the daemon, for daemon and client alike.
SOCKET = "TENSORFERRY_SOCKET"
#: TOML configuration file of the daemon.
CONFIG = "TENSORFERRY_CONFIG"
#: Log level of the daemon (DEBUG, INFO, WARNING, ERROR).
LOG_LEVEL = "TENSORFERRY_LOG_LEVEL"
#: Optional S3 endpoint override (standard AWS variable).
AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
#: Forward proxies for the daemon's store requests (standard variables; lowercase wins, as
#: in curl): HTTP_PROXY for http stores, HTTPS_PROXY for https ones, NO_PROXY exempts hosts.
#: ``[s3] proxy`` in the config file takes the place of the first two.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy")
#: CA bundle for https stores (standard AWS variable); ``[s3] ca_bundle`` wins.
AWS_CA_BUNDLE = "AWS_CA_BUNDLE"
#: Worker side, tests only: comma-separated GPU UUIDs. When set, the client imports CUDA
#: arenas through the fake CUDA API (tensorferry.cuda.fake) as if this process saw these
#: GPUs as cuda:0, cuda:1, ...; it pairs with a daemon configured with [cuda] api = "fake".
FAKE_CUDA = "TENSORFERRY_FAKE_CUDA"
#: Benchmarks only (bench/bench_fresh.py), never in production: "1" makes the daemon
#: reserve a fresh arena whole before its first GET (the order before issue #26), to
#: measure what reserving it alongside the fetch gains.
RESERVE_FIRST = "TENSORFERRY_RESERVE_FIRST"
#: Tests only, never in production: seconds the warm pool ([limits] warm_bytes) pauses
#: after each region it populates, so a test sees it part-populated on any machine.
WARM_PACE = "TENSORFERRY_TEST_WARM_PACE"
#: Worker side: seconds a worker waits for a stopped daemon to come back and re-establish
#: the leases of the models it holds (default 300); 0 turns re-establishing off.
LEASE_RESTORE_SECONDS = "TENSORFERRY_LEASE_RESTORE_SECONDS"
DEFAULT_LEASE_RESTORE_SECONDS = 300.0


def _get(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The socket to use: an explicit value, else $TENSORFERRY_SOCKET, else the default."""
    if explicit is not None and str(explicit):
        return Path(explicit)
    env = _get(SOCKET)
    return Path(env) if env else DEFAULT_SOCKET


def socket_from_env() -> Path | None:
    env = _get(SOCKET)
    return Path(env) if env else None


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    if explicit is not None and str(explicit):
        return Path(explicit)
    env = _get(CONFIG)
    return Path(env) if env else None


def notify_socket() -> str | None:
    """systemd's $NOTIFY_SOCKET (Type=notify services)."""
    return _get("NOTIFY_SOCKET")


#: systemd socket activation and file-descriptor store (sd_listen_fds(3)): the fds passed
#: from 3 on, for the process whose pid is LISTEN_PID, named by LISTEN_FDNAMES.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds() -> tuple[int | None, int | None, str | None]:
    """$LISTEN_PID and $LISTEN_FDS (None unless a decimal number) and $LISTEN_FDNAMES
    (None when unset; names may be empty, so it is not stripped)."""
    pid, count = _get("LISTEN_PID"), _get("LISTEN_FDS")
    return (
        int(pid) if pid and pid.isdigit() else None,
        int(count) if count and count.isdigit() else None,
        os.environ.get("LISTEN_FDNAMES"),
    )


def forget_listen_fds() -> None:
    """Unset the LISTEN_* variables, so processes this one starts do not take them as theirs."""
    for name in LISTEN_VARIABLES:
        os.environ.pop(name, None)


def watchdog_usec() -> int | None:
    value = _get("WATCHDOG_USEC")
    return int(value) if value and value.isdigit() else None


def watchdog_pid() -> int | None:
    value = _get("WATCHDOG_PID")
    return int(value) if value and value.isdigit() else None


def log_level() -> str | None:
    return _get(LOG_LEVEL)


def aws_endpoint_url() -> str | None:
    return _get(AWS_ENDPOINT_URL)


def fake_cuda_devices() -> list[str] | None:
    value = _get(FAKE_CUDA)
    return [u.strip() for u in value.split(",") if u.strip()] if value else None


def proxy_variables() -> dict[str, str]:
    """``{"http_proxy": ..., "https_proxy": ..., "no_proxy": ...}``, each from the lowercase
    variable or else the uppercase one; unset ones are left out."""
    found = {}
    for name in PROXY_VARIABLES:
        value = _get(name) or _get(name.upper())
        if value:
            found[name] = value
    return found


def aws_ca_bundle() -> str | None:
    return _get(AWS_CA_BUNDLE)


def reserve_first() -> bool:
    return _get(RESERVE_FIRST) == "1"


def warm_pace() -> float:
    value = _get(WARM_PACE)
    return float(value) if value else 0.0


def lease_restore_seconds() -> float:
    """$TENSORFERRY_LEASE_RESTORE_SECONDS, else the default; a value that is not a
    non-negative number is the default too (a worker must not fail over its lease)."""
    value = _get(LEASE_RESTORE_SECONDS)
    try:
        seconds = float(value) if value else DEFAULT_LEASE_RESTORE_SECONDS
    except ValueError:
        return DEFAULT_LEASE_RESTORE_SECONDS
    return seconds if seconds >= 0 else DEFAULT_LEASE_RESTORE_SECONDS
