"""Daemon settings: one typed object, read from a TOML file plus the environment.

This is the only daemon module that reads configuration; environment variables come
through ``tensorferry.env``. Every key's default, parser and rule is in the schema
(``config_keys.KEYS``); the dataclasses here take their defaults from it and check its rules
when built, from a file or in code.
"""

from __future__ import annotations

import dataclasses
import grp
import tomllib
from pathlib import Path
from typing import Any

from tensorferry import env
from tensorferry.daemon.config.keys import MiB as MiB
from tensorferry.daemon.config.keys import check, default, read, unknown_key
from tensorferry.daemon.config.values import Headers, host_port
from tensorferry.daemon.config.values import normalize_allow_entry as normalize_allow_entry
from tensorferry.daemon.config.values import parse_size as parse_size
from tensorferry.daemon.gpu.settings import CudaSettings, cuda_settings

# Kept importable from here: ConfigError lived in this module before it joined errors.py.
from tensorferry.errors import ConfigError as ConfigError

DEFAULT_CHUNK_SIZE: int = default("s3.chunk_size")
DEFAULT_CONCURRENCY: int = default("s3.concurrency")
DEFAULT_MAX_TENSORS: int = default("limits.max_tensors")


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3Settings:
    """``[s3]``; what each field means is documented in ``config_keys.KEYS``."""

    endpoint_url: str | None = default("s3.endpoint_url")
    region: str | None = default("s3.region")
    profile: str | None = default("s3.profile")
    addressing_style: str = default("s3.addressing_style")
    concurrency: int = default("s3.concurrency")
    max_concurrency: int = default("s3.max_concurrency")
    target_rate: int = default("s3.target_rate")
    hedge: bool = default("s3.hedge")
    chunk_size: int = default("s3.chunk_size")
    read_timeout: float = default("s3.read_timeout")
    connect_timeout: float = default("s3.connect_timeout")
    attempts: int = default("s3.attempts")
    retry_budget: int = default("s3.retry_budget")
    range_deadline: float = default("s3.range_deadline")
    #: Out of repr: the URL may carry credentials (messages show ``proxy.redact``ed text).
    proxy: str | None = dataclasses.field(default=default("s3.proxy"), repr=False)
    proxy_fallback: bool = default("s3.proxy_fallback")
    headers: Headers = dataclasses.field(default=default("s3.headers"))
    ca_bundle: Path | None = dataclasses.field(default=default("s3.ca_bundle"))

    def __post_init__(self) -> None:
        check(self, "s3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TcpSettings:
    """``[tcp]``: gRPC over TCP, always TLS; it exists only when the file sets it."""

    listen: str
    cert: Path
    key: Path
    client_ca: Path | None = dataclasses.field(default=default("tcp.client_ca"))

    def __post_init__(self) -> None:
        check(self, "tcp")


def _tcp_settings(data: dict[str, Any]) -> TcpSettings | None:
    values = read(data, "tcp")
    if not values:
        return None
    # Checked ahead of TcpSettings' rules: without a listen address nothing else matters.
    listen = values.get("listen")
    problem = "expected host:port, got None" if listen is None else host_port(listen)
    if problem:
        raise ConfigError(f"tcp.listen: {problem}")
    if not values.get("cert") or not values.get("key"):
        raise ConfigError(
            "tcp: gRPC over TCP needs TLS: set [tcp] cert and key (plaintext TCP is refused)"
        )
    return TcpSettings(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """``[limits]``; what each field means is documented in ``config_keys.KEYS``.

    ``max_loads_per_client`` counts clients by the name they declare: fairness among
    cooperating workers, not a security limit.
    """

    max_model_bytes: int = default("limits.max_model_bytes")
    warm_bytes: int = default("limits.warm_bytes")
    max_concurrent_loads: int = default("limits.max_concurrent_loads")
    max_loads_per_client: int = default("limits.max_loads_per_client")
    max_leases: int = default("limits.max_leases")
    max_control_calls: int = default("limits.max_control_calls")
    max_transfer_calls: int = default("limits.max_transfer_calls")
    max_request_bytes: int = default("limits.max_request_bytes")
    max_tensors: int = default("limits.max_tensors")

    def __post_init__(self) -> None:
        check(self, "limits")


#: The schema's sections whose keys are fields of ``Settings`` itself.
_FLAT = ("", "sources", "memory", "cache", "metrics", "fetch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The daemon's settings. Fields backed by a config key (most) are documented in
    ``config_keys.KEYS``; ``allow_any_source`` is ``[sources] allow_any``, ``recycle_bytes``
    ``[memory] recycle``, ``cache_*`` ``[cache]`` and ``metrics_listen`` ``[metrics] listen``.
    """

    socket: Path = dataclasses.field(default=default("socket"))
    socket_mode: int = default("socket_mode")
    socket_group: str | None = default("socket_group")
    tcp: TcpSettings | None = None
    allow: tuple[str, ...] = default("sources.allow")
    allow_any_source: bool = default("sources.allow_any")
    listing_reuse: float = default("sources.listing_reuse")
    #: Where CPU arenas live (POSIX shared memory; workers map from the same place). Not a
    #: config key: workers must agree on it.
    shm_dir: Path = Path("/dev/shm")
    shm_budget: int = default("memory.shm_budget")
    recycle_bytes: int = default("memory.recycle")
    adopt_arenas: bool = default("memory.adopt")
    s3: S3Settings = dataclasses.field(default_factory=S3Settings)
    log_level: str = default("log_level")
    log_format: str = default("log_format")
    cache_dir: Path | None = dataclasses.field(default=default("cache.dir"))
    cache_budget: int = default("cache.budget")
    metrics_listen: str | None = default("metrics.listen")
    preload: tuple[str, ...] = default("preload")
    #: ``[fetch] workers`` (``values.AUTO``: derived at start; 0: none) and ``worker_mode``.
    fetch_workers: int = default("fetch.workers")
    fetch_worker_mode: str = default("fetch.worker_mode")
    shutdown_grace: float = default("shutdown_grace")
    limits: Limits = dataclasses.field(default_factory=lambda: Limits())
    #: GPU side (daemon/gpu/settings.py): which CUDA, pinned ring, copy streams.
    cuda: CudaSettings = dataclasses.field(default_factory=lambda: CudaSettings())

    def __post_init__(self) -> None:
        check(self, *_FLAT)

    def group_id(self) -> int:
        """The socket group's gid, or -1 (leave the group as it is)."""
        if self.socket_group is None:
            return -1
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group: no such group {self.socket_group!r}") from None


def _read_file(config_file: str | Path | None) -> dict[str, Any]:
    """The TOML file (argument or $TENSORFERRY_CONFIG), its keys checked; {} if none."""
    path = env.config_path(config_file)
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    problem = unknown_key(data, path)
    if problem:
        raise ConfigError(problem)
    return data


def _s3_settings(data: dict[str, Any]) -> S3Settings:
    values = read(data, "s3")
    # The file wins over $AWS_ENDPOINT_URL: it names the store this daemon was set up for.
    if values.get("endpoint_url") is None:
        values["endpoint_url"] = env.aws_endpoint_url()
    if values.get("ca_bundle") is None and env.aws_ca_bundle():
        values["ca_bundle"] = Path(str(env.aws_ca_bundle()))
    return S3Settings(**values)


def load_s3_settings(config_file: str | Path | None = None) -> S3Settings:
    """The ``[s3]`` settings alone, for commands that talk to the store but are no daemon
    (``tensorferry prepare``): the rest of the file is checked for unknown keys only."""
    return _s3_settings(_read_file(config_file))


def load_settings(
    config_file: str | Path | None = None,
    *,
    socket: str | Path | None = None,
    allow: tuple[str, ...] = (),
    allow_any_source: bool = False,
) -> Settings:
    """Settings from the TOML file (argument or $TENSORFERRY_CONFIG), env, then arguments."""
    data = _read_file(config_file)
    values: dict[str, Any] = {}
    for section in _FLAT:
        values.update(read(data, section))
    # Precedence: argument, then $TENSORFERRY_SOCKET, then the file, then the default.
    file_socket = values.pop("socket", None)
    if socket is None and env.socket_from_env() is None and file_socket is not None:
        socket = file_socket
    values["socket"] = env.socket_path(socket)
    values["allow"] = values.get("allow", ()) + tuple(allow)
    values["allow_any_source"] = values.get("allow_any_source", False) or allow_any_source
    env_level = env.log_level()
    if env_level is not None:
        values["log_level"] = env_level
    return Settings(
        **values,
        tcp=_tcp_settings(data),
        s3=_s3_settings(data),
        limits=Limits(**read(data, "limits")),
        cuda=cuda_settings(data),
    )
