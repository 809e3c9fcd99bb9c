"""Daemon settings: one typed object, read from a TOML file plus the environment.

This is the only daemon module that reads configuration; environment variables come
through ``tensorferry._env``.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from tensorferry import _env
from tensorferry.daemon.config_keys import unknown_key
from tensorferry.daemon.cuda_settings import CudaSettings, cuda_settings
from tensorferry.errors import InvalidRequest

MiB = 1 << 20
DEFAULT_CHUNK_SIZE = 8 * MiB
DEFAULT_CONCURRENCY = 32
DEFAULT_MAX_TENSORS = 200_000

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the rule."""


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a string such as "8MiB" or "16 GiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ConfigError(f"{key}: expected a byte size such as 8MiB or 16GiB, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3Settings:
    #: Endpoint of an S3-compatible store; None means AWS (or $AWS_ENDPOINT_URL).
    endpoint_url: str | None = None
    #: Region for signing; None lets botocore resolve it (profile, $AWS_REGION).
    region: str | None = None
    #: AWS profile name; None uses the default credential chain.
    profile: str | None = None
    #: "path" for most S3-compatible stores, "virtual" or "auto" for AWS.
    addressing_style: str = "auto"
    #: Parallel range GETs per load (each on its own keep-alive connection).
    concurrency: int = DEFAULT_CONCURRENCY
    #: Bytes per range GET.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Seconds to wait for a response's first byte or between body reads.
    read_timeout: float = 30.0
    connect_timeout: float = 10.0
    #: Attempts per range GET (the first included) for errors that may pass.
    attempts: int = 5
    #: Retries per load beyond one per 8 ranges.
    retry_budget: int = 16
    #: Wall-clock limit for one attempt at one range.
    range_deadline: float = 300.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TcpSettings:
    #: host:port to listen on, e.g. "127.0.0.1:7443".
    listen: str
    #: PEM files: the server's certificate chain and key.
    cert: Path
    key: Path
    #: PEM CA bundle; when set, clients must present a certificate it signed.
    client_ca: Path | None = None


def _tcp_settings(tcp: dict[str, Any]) -> TcpSettings | None:
    if not tcp:
        return None
    listen = tcp.get("listen")
    if not isinstance(listen, str) or ":" not in listen:
        raise ConfigError(f"tcp.listen: expected host:port, got {listen!r}")
    if not tcp.get("cert") or not tcp.get("key"):
        raise ConfigError(
            "tcp: gRPC over TCP needs TLS: set [tcp] cert and key (plaintext TCP is refused)"
        )
    paths = {name: Path(str(tcp[name])) for name in ("cert", "key", "client_ca") if tcp.get(name)}
    for name, path in paths.items():
        if not path.is_file():
            raise ConfigError(f"tcp.{name}: {path} does not exist")
    return TcpSettings(
        listen=listen, cert=paths["cert"], key=paths["key"], client_ca=paths.get("client_ca")
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    #: Largest model (bytes fetched) one load may bring in; 0 means no limit.
    max_model_bytes: int = 0
    #: Cold loads fetching at once; more are refused, not queued.
    max_concurrent_loads: int = 8
    #: Cold loads one client (by its declared name) may have fetching at once. Clients
    #: name themselves, so this is fairness among cooperating workers, not a security limit.
    max_loads_per_client: int = 4
    #: Leases held at once: each worker's Load stream, from its request until it ends.
    max_leases: int = 4096
    #: Status, List, Release and Evict calls open at once: a class of their own, so
    #: operators keep control while the leases are full.
    max_control_calls: int = 64
    #: Preload and GetFile calls open at once.
    max_transfer_calls: int = 256
    #: Largest request message the daemon accepts.
    max_request_bytes: int = 4 << 20
    #: Tensors one model (all its shards) may have. Every tensor costs header parsing and
    #: memory while resident; the largest public checkpoints have tens of thousands.
    max_tensors: int = DEFAULT_MAX_TENSORS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    #: Unix socket the daemon listens on.
    socket: Path = _env.DEFAULT_SOCKET
    #: Permission bits of the socket; workers need write access to connect.
    socket_mode: int = 0o660
    #: Group that owns the socket and the arenas (workers join it); None keeps ours.
    socket_group: str | None = None
    #: Optional gRPC over TCP; always TLS.
    tcp: TcpSettings | None = None
    #: Allowed sources: ``s3://bucket/prefix`` entries and absolute local directories.
    allow: tuple[str, ...] = ()
    #: Serve any source the credentials reach (explicit opt-in, logged as a warning).
    allow_any_source: bool = False
    #: Where CPU arenas live (POSIX shared memory; workers map from the same place).
    shm_dir: Path = Path("/dev/shm")
    #: Upper bound for CPU arenas together (0: MemAvailable is the only bound).
    shm_budget: int = 0
    #: Freed arenas kept for reuse, up to this many bytes: refilling pages the kernel
    #: already zeroed costs a fraction of the CPU of fresh ones. Yields to new loads.
    recycle_bytes: int = 4 << 30
    s3: S3Settings = dataclasses.field(default_factory=S3Settings)
    log_level: str = "INFO"
    #: "text" or "json" (one object per line, for log shippers).
    log_format: str = "text"
    #: The local disk tier: a directory and its byte budget; None: off.
    cache_dir: Path | None = None
    cache_budget: int = 100 << 30
    #: host:port of the Prometheus endpoint (loopback only); None: off.
    metrics_listen: str | None = None
    #: Models to load at start (READY does not wait for them).
    preload: tuple[str, ...] = ()
    #: On SIGTERM, seconds to wait for workers to end their leases before exiting.
    shutdown_grace: float = 20.0
    limits: Limits = dataclasses.field(default_factory=lambda: Limits())
    #: GPU side (daemon/cuda_settings.py): which CUDA, pinned ring, copy streams.
    cuda: CudaSettings = dataclasses.field(default_factory=lambda: CudaSettings())

    def __post_init__(self) -> None:
        if not 1 <= self.s3.concurrency <= 1024:
            raise ConfigError(f"s3.concurrency: must be 1..1024, got {self.s3.concurrency}")
        if not 1 <= self.s3.attempts <= 100:
            raise ConfigError(f"s3.attempts: must be 1..100, got {self.s3.attempts}")
        if not 64 * 1024 <= self.s3.chunk_size <= 1 << 30:
            raise ConfigError(f"s3.chunk_size: must be 64KiB..1GiB, got {self.s3.chunk_size}")
        if self.limits.max_tensors < 1:
            raise ConfigError(
                f"limits.max_tensors: must be 1 or more, got {self.limits.max_tensors}"
            )
        if len(str(self.socket).encode()) > 107:
            raise ConfigError(
                f"socket: Unix socket paths are limited to 107 bytes, got {self.socket}"
            )
        for entry in self.allow:
            try:
                normalize_allow_entry(entry)
            except InvalidRequest as exc:
                raise ConfigError(f"sources.allow: {exc.message}") from None
        if self.socket_group is not None:
            self.group_id()  # fail at start, not at the first arena

    def group_id(self) -> int:
        """The socket group's gid, or -1 (leave the group as it is)."""
        if self.socket_group is None:
            return -1
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group: no such group {self.socket_group!r}") from None


def normalize_allow_entry(entry: str) -> str:
    """Allowlist entries end in "/" so that s3://b/models never admits s3://b/models-evil."""
    if entry.startswith("s3://"):
        rest = entry[5:]
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise InvalidRequest(f"{entry!r} names no bucket")
        return entry if entry.endswith("/") else entry + "/"
    path = Path(entry)
    if not path.is_absolute():
        raise InvalidRequest(f"{entry!r} is neither an s3:// prefix nor an absolute directory")
    return str(path.resolve()).rstrip("/") + "/"


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}]: expected a table")
    return value


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _loopback(listen: Any, key: str) -> str | None:
    """host:port on a loopback address (metrics are no API: they stay on the host)."""
    if listen is None:
        return None
    host, _, port = str(listen).rpartition(":")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback or not port.isdigit():
        raise ConfigError(f"{key}: {listen} is not a loopback host:port")
    return str(listen)


def load_settings(
    config_file: str | Path | None = None,
    *,
    socket: str | Path | None = None,
    allow: tuple[str, ...] = (),
    allow_any_source: bool = False,
) -> Settings:
    """Settings from the TOML file (argument or $TENSORFERRY_CONFIG), env, then arguments."""
    data: dict[str, Any] = {}
    path = _env.config_path(config_file)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        problem = unknown_key(data, path)
        if problem:
            raise ConfigError(problem)
    sources, s3, memory = _section(data, "sources"), _section(data, "s3"), _section(data, "memory")
    limits, cache = _section(data, "limits"), _section(data, "cache")
    s3_settings = S3Settings(
        endpoint_url=s3.get("endpoint_url") or _env.aws_endpoint_url(),
        region=s3.get("region"),
        profile=s3.get("profile"),
        addressing_style=str(s3.get("addressing_style", "auto")),
        concurrency=int(s3.get("concurrency", DEFAULT_CONCURRENCY)),
        chunk_size=parse_size(s3.get("chunk_size", DEFAULT_CHUNK_SIZE), "s3.chunk_size"),
        read_timeout=float(s3.get("read_timeout", 30.0)),
        connect_timeout=float(s3.get("connect_timeout", 10.0)),
        attempts=int(s3.get("attempts", 5)),
        retry_budget=int(s3.get("retry_budget", 16)),
        range_deadline=float(s3.get("range_deadline", 300.0)),
    )
    if s3_settings.addressing_style not in ("auto", "path", "virtual"):
        raise ConfigError(
            f"s3.addressing_style: must be auto, path or virtual, "
            f"got {s3_settings.addressing_style!r}"
        )
    # Precedence: argument, then $TENSORFERRY_SOCKET, then the file, then the default.
    if socket is None and _env.socket_from_env() is None and data.get("socket"):
        socket = str(data["socket"])
    allow_entries = tuple(sources.get("allow", ())) + tuple(allow)
    return Settings(
        socket=_env.socket_path(socket),
        socket_mode=int(str(data.get("socket_mode", "660")), 8),
        socket_group=str(data["socket_group"]) if data.get("socket_group") else None,
        tcp=_tcp_settings(_section(data, "tcp")),
        allow=allow_entries,
        allow_any_source=bool(sources.get("allow_any", False)) or allow_any_source,
        shm_budget=parse_size(memory.get("shm_budget", 0), "memory.shm_budget"),
        recycle_bytes=parse_size(memory.get("recycle", 4 << 30), "memory.recycle"),
        limits=Limits(
            max_model_bytes=parse_size(limits.get("max_model_bytes", 0), "limits.max_model_bytes"),
            max_concurrent_loads=int(limits.get("max_concurrent_loads", 8)),
            max_loads_per_client=int(limits.get("max_loads_per_client", 4)),
            # max_concurrent_rpcs: its old name, from when every call counted against it.
            max_leases=int(limits.get("max_leases", limits.get("max_concurrent_rpcs", 4096))),
            max_control_calls=int(limits.get("max_control_calls", 64)),
            max_transfer_calls=int(limits.get("max_transfer_calls", 256)),
            max_request_bytes=parse_size(
                limits.get("max_request_bytes", 4 << 20), "limits.max_request_bytes"
            ),
            max_tensors=int(limits.get("max_tensors", DEFAULT_MAX_TENSORS)),
        ),
        s3=s3_settings,
        log_level=_env.log_level() or str(data.get("log_level", "INFO")),
        log_format=_choice(data.get("log_format", "text"), ("text", "json"), "log_format"),
        preload=tuple(str(u) for u in data.get("preload", ())),
        cache_dir=Path(cache["dir"]) if cache.get("dir") else None,
        cache_budget=parse_size(cache.get("budget", 100 << 30), "cache.budget"),
        metrics_listen=_loopback(_section(data, "metrics").get("listen"), "metrics.listen"),
        shutdown_grace=float(data.get("shutdown_grace", 20.0)),
        cuda=_cuda(_section(data, "cuda")),
    )


def _cuda(section: dict[str, Any]) -> CudaSettings:
    try:
        return cuda_settings(section, parse_size)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
