"""The configuration schema: every key a config file may use, each defined once.

A ``Key`` holds its default, its parser, its rule and its documentation. The settings
dataclasses (config.py, cuda_settings.py) take their defaults from here, ``load_settings``
parses through ``read``, their ``__post_init__`` applies the rules through ``check``, and the
table in docs/operations.md is generated from ``markdown_table`` (scripts/gen_config_docs.py;
a test keeps it current).

A misspelt key is refused at start, not ignored: an ignored `shm_budgte` would leave the
host unprotected without a word.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any

from tensorferry import env
from tensorferry.daemon.config.values import (
    AUTO,
    Parse,
    Rule,
    addressing_style,
    allow_entries,
    at_least,
    between,
    boolean,
    count_or_auto,
    fake_devices,
    group_exists,
    header_tables,
    headers_rule,
    host_port,
    integer,
    integer_or_auto,
    is_file,
    loopback,
    number,
    octal,
    one_of,
    optional_path,
    optional_text,
    parse_size,
    size_text,
    socket_length,
    strings,
    text,
)
from tensorferry.daemon.store.proxy import proxy_rule, proxy_text
from tensorferry.errors import ConfigError

MiB = 1 << 20
CUDA_APIS = ("auto", "cupy", "fake", "off")


@dataclasses.dataclass(frozen=True)
class Key:
    #: The TOML table ("" for the top level) and the key's name in it.
    section: str
    name: str
    default: Any
    parse: Parse
    rule: Rule | None
    #: The "meaning" column of the documentation table (Markdown).
    doc: str
    #: The settings attribute, where it differs from ``name``.
    field: str = ""
    #: Older names, still read when ``name`` is absent.
    aliases: tuple[str, ...] = ()
    #: The default as the documentation shows it, where the value alone would mislead
    #: (0 for "no limit").
    shown: str = ""

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def attr(self) -> str:
        return self.field or self.name


_OFF = "off"
_KIB, _GIB = 1 << 10, 1 << 30
_FAKE = '`api = "fake"` only (CI): '

KEYS: tuple[Key, ...] = (
    Key("", "socket", env.DEFAULT_SOCKET, optional_path, socket_length,
        "Unix socket (`--socket` and `$TENSORFERRY_SOCKET` win)"),
    Key("", "socket_mode", 0o660, octal, None,
        "socket permissions; arenas get the read bits of it (`440`)", shown='`"660"`'),
    Key("", "socket_group", None, optional_text, group_exists,
        "group owning the socket and arenas; workers join it"),
    Key("", "preload", (), strings, None, "URIs loaded at start; READY does not wait for them"),
    Key("", "shutdown_grace", 20.0, number, None, "seconds SIGTERM waits for leases to end"),
    Key("", "log_level", "INFO", text, one_of(*logging.getLevelNamesMapping()),
        "`$TENSORFERRY_LOG_LEVEL` and `serve --log-level` win"),
    Key("", "log_format", "text", text, one_of("text", "json"),
        "`json`: one object per line; every finished load with its timings"),
    Key("sources", "allow", (), strings, allow_entries,
        "`s3://bucket/prefix/` and absolute directories a load may name (`--allow` adds)",
        shown="required"),
    Key("sources", "allow_any", False, boolean, None,
        "serve anything the credentials reach (same as `--allow-any-source`)",
        field="allow_any_source"),
    Key("sources", "listing_reuse", 0.0, number, at_least(0),
        "seconds a load reuses its source's last listing instead of listing again, when the "
        "model that listing names is resident (an attach: no LIST, which costs 20-60 ms on "
        "AWS); a load still sees every change to the weight files made this long before it "
        "arrived; 0: every load lists"),
    Key("s3", "endpoint_url", None, optional_text, None, "S3-compatible store",
        shown="AWS (`$AWS_ENDPOINT_URL`)"),
    Key("s3", "region", None, optional_text, None, "region for signing",
        shown="botocore's chain"),
    Key("s3", "profile", None, optional_text, None, "AWS profile for credentials",
        shown="botocore's chain"),
    Key("s3", "addressing_style", "auto", text, addressing_style,
        "`path` for most S3-compatible stores, `virtual` or `auto` for AWS"),
    Key("s3", "concurrency", 32, integer, between(1, 1024),
        "range GETs in flight when a load starts, each on its own keep-alive connection"),
    Key("s3", "max_concurrency", 256, integer, between(1, 4096),
        "range GETs in flight a load may grow to while its throughput keeps rising (a "
        "value at or below `concurrency` fixes it); also the connections per store host"),
    Key("s3", "target_rate", 0, parse_size, None,
        "bytes per second at which a load stops adding GETs in flight, e.g. `\"12GiB\"` for "
        "a 100 Gb/s NIC; a load's first step jumps to the GETs this rate needs (unset: the "
        "fastest NIC's reported speed, else 10 Gb/s, for that jump only)",
        shown="none: grow while it pays"),
    Key("s3", "hedge", True, boolean, None,
        "ask again, on another connection, for a range far slower than the load's others "
        "(at most 5% of a load's ranges)"),
    Key("s3", "proxy", None, proxy_text, proxy_rule,
        "forward proxy for range GETs and store calls, `http://[user:pass@]host:port` "
        "(https stores through CONNECT); `\"off\"`: none even where the environment names one",
        shown="`$HTTPS_PROXY` / `$HTTP_PROXY`, less `$NO_PROXY`"),
    Key("s3", "proxy_fallback", True, boolean, None,
        "ask the store directly for a range the proxy failed with an answer of its own "
        "(Dragonfly's error header, one without an S3 error body, no connection); counted "
        "in `tensorferry_proxy_fallbacks_total`"),
    Key("s3", "headers", (), header_tables, headers_rule,
        "extra headers on the range GETs of a source: `[s3.headers.\"s3://bucket/prefix/\"]` "
        "tables of `Name = \"value\"` (e.g. `X-Dragonfly-Tag`); the longest matching prefix wins",
        shown="none"),
    Key("s3", "ca_bundle", None, optional_path, is_file,
        "PEM CA bundle for https stores", shown="`$AWS_CA_BUNDLE`, else the system's"),
    Key("s3", "chunk_size", 8 * MiB, parse_size, between(64 * _KIB, _GIB, sizes=True),
        "bytes per range GET"),
    Key("s3", "read_timeout", 30.0, number, None,
        "seconds without data before a GET is abandoned (and retried)"),
    Key("s3", "connect_timeout", 10.0, number, None, "seconds to open a connection"),
    Key("s3", "attempts", 5, integer, between(1, 100),
        "attempts per range for errors that may pass (reset, 5xx, stall, bad range)"),
    Key("s3", "retry_budget", 16, integer, None, "retries per load beyond one per 8 ranges"),
    Key("s3", "range_deadline", 300.0, number, None, "wall-clock limit for one attempt"),
    Key("fetch", "workers", AUTO, count_or_auto, between(0, 256, or_auto=True),
        "fetch workers: range GETs spread over this many event loops, each with its own "
        "connections; 0: none (every GET in the main process); `auto`: enough for the link "
        "rate at ~1.5 GB/s each, at most half the cores, none on a host with 2 cores or "
        "fewer", field="fetch_workers", shown="`auto`"),
    Key("fetch", "worker_mode", "process", text, one_of("process", "thread", "off"),
        "`process` (own interpreter and GIL each), `thread` (own event loop, shared GIL), or "
        "`off`: every GET on the daemon's one event loop", field="fetch_worker_mode"),
    Key("memory", "shm_budget", 0, parse_size, None, "cap for CPU arenas together",
        shown="MemAvailable"),
    Key("memory", "recycle", 4 * _GIB, parse_size, None,
        "freed arenas kept, mapped, to be refilled (no page zeroing); one between half and "
        "twice a new model's size is shrunk or grown to it; yields to new loads",
        field="recycle_bytes"),
    Key("memory", "adopt", True, boolean, None,
        "CPU arenas outlive the daemon: each ready model's arena is sealed with a manifest, "
        "left in place at exit, and adopted by the next daemon on this socket when its "
        "source is unchanged (no refetch after a crash, restart or upgrade); false: removed "
        "at exit and swept at start", field="adopt_arenas"),
    Key("limits", "max_model_bytes", 0, parse_size, None, "largest single load",
        shown="unlimited"),
    Key("limits", "warm_bytes", 0, parse_size, None,
        "shared memory populated in the background after start, kept as a recycled arena "
        "for the first load that fits (a fresh daemon's first load then pays no page "
        "zeroing); within [memory] shm_budget and [memory] recycle", shown="none"),
    Key("limits", "max_concurrent_loads", 8, integer, None,
        "cold loads fetching at once; more are refused, not queued"),
    Key("limits", "max_loads_per_client", 4, integer, None,
        "per declared client name (fairness, not security)"),
    Key("limits", "max_leases", 4096, integer, None,
        "leases held at once: open Load calls, from request to end",
        aliases=("max_concurrent_rpcs",)),
    Key("limits", "max_control_calls", 64, integer, None,
        "Status, List, Release and Evict calls open at once; counted apart, so a daemon "
        "full of leases can still be inspected and freed"),
    Key("limits", "max_transfer_calls", 256, integer, None,
        "Preload and GetFile calls open at once"),
    Key("limits", "max_request_bytes", 4 * MiB, parse_size, None, "largest request message"),
    Key("limits", "max_tensors", 200_000, integer, at_least(1),
        "tensors one model may have, all shards together; checked on the index and on each "
        "header as it is parsed, before any arena"),
    Key("tcp", "listen", None, optional_text, host_port,
        "host:port for gRPC over TCP, TLS only", shown=_OFF),
    Key("tcp", "cert", None, optional_path, is_file,
        "PEM certificate chain of the server (needed with `listen`)"),
    Key("tcp", "key", None, optional_path, is_file, "PEM key of the server (needed with `listen`)"),
    Key("tcp", "client_ca", None, optional_path, is_file,
        "PEM CA bundle; when set, clients must present a certificate it signed"),
    Key("metrics", "listen", None, optional_text, loopback,
        "`127.0.0.1:PORT`: Prometheus metrics, loopback only", field="metrics_listen",
        shown=_OFF),
    Key("cache", "dir", None, optional_path, None,
        "the local disk tier: chunks of loaded models (crc32c-checked, LRU) so a reload "
        "after eviction or restart skips the store", field="cache_dir", shown=_OFF),
    Key("cache", "budget", 100 * _GIB, parse_size, None, "bytes the disk tier may hold",
        field="cache_budget"),
    Key("cuda", "api", "auto", text, one_of(*CUDA_APIS),
        "`auto` (cupy if it imports and sees a GPU, else CPU only), `cupy`, `off`; `fake` is "
        "CI's stand-in"),
    Key("cuda", "ring_slots", 0, integer_or_auto, between(2, 4096, or_zero=True),
        "pinned host slots per NUMA node with GPUs, allocated once at start; `auto`: the "
        "range GETs the link needs (link rate / 90 MB/s per connection) plus 2 per copy "
        "stream, 16..1024, within `ring_bytes`", shown="`auto`"),
    Key("cuda", "ring_bytes", 0, parse_size, None,
        "cap on the pinned memory of all rings when `ring_slots` is `auto` (pinned memory "
        "cannot swap)", shown="MemTotal / 16"),
    Key("cuda", "slot_size", 0, parse_size, between(64 * _KIB, _GIB, sizes=True, or_zero=True),
        "bytes per slot (one range GET fills one slot)", shown="`[s3] chunk_size`"),
    Key("cuda", "copy_streams", 2, integer, between(1, 16),
        "H2D copy streams per GPU; consecutive slots alternate between them"),
    Key("cuda", "reserve", _GIB, parse_size, None,
        "GPU memory each device keeps free when an arena is placed"),
    Key("cuda", "fake_devices", (), fake_devices, None,
        _FAKE + "`[[cuda.fake_devices]]` tables of `uuid`, `memory` and `numa_node`, in "
        "the daemon's numbering", shown="none"),
    Key("cuda", "fake_jitter", 0.0, number, None,
        _FAKE + "each copy first waits up to this many seconds, so streams complete out of "
        "order"),
)  # fmt: skip

_BY_NAME = {key.dotted: key for key in KEYS}
SECTIONS = tuple(dict.fromkeys(key.section for key in KEYS if key.section))


def default(dotted: str) -> Any:
    """The default of ``dotted`` ("s3.concurrency"), for a dataclass field."""
    return _BY_NAME[dotted].default


def read(data: dict[str, Any], section: str) -> dict[str, Any]:
    """The parsed values ``section`` of a config file sets, by settings attribute."""
    table = data.get(section, {}) if section else data
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}]: expected a table")
    values: dict[str, Any] = {}
    for key in KEYS:
        if key.section != section:
            continue
        for name in (key.name, *key.aliases):
            if name in table:
                where = f"{section}.{name}" if section else name
                values[key.attr] = key.parse(table[name], where)
                break
    return values


def check(settings: object, *sections: str) -> None:
    """Apply the rules of ``sections``' keys to ``settings``' attributes (None is unset)."""
    for key in KEYS:
        if key.section in sections and key.rule is not None:
            value = getattr(settings, key.attr)
            problem = None if value is None else key.rule(value)
            if problem:
                raise ConfigError(f"{key.dotted}: {problem}")


def unknown_key(data: dict[str, Any], path: Path) -> str | None:
    """A message naming the first unknown key of ``data`` (read from ``path``), or None."""
    for section in ("", *SECTIONS):
        allowed = [n for k in KEYS if k.section == section for n in (k.name, *k.aliases)]
        table = data if not section else data.get(section, {})
        if not section:
            allowed += SECTIONS
        if not isinstance(table, dict):
            continue
        for name in table:
            if name not in allowed:
                dotted = f"{section}.{name}" if section else name
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"[{section}]" if section else "the top level"
                return f"config file {path}: unknown key {dotted!r} in {where}{hint}"
    return None


def shown_default(key: Key) -> str:
    """The default as the documentation table shows it."""
    value = key.default
    if key.shown:
        return key.shown
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if key.parse is parse_size:
        return f"`{size_text(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def markdown_table() -> str:
    """The configuration table of docs/operations.md."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in KEYS:
        name = f"[{key.section}] {key.name}" if key.section else key.name
        doc = key.doc + "".join(f" (`{old}` is its old name, still read)" for old in key.aliases)
        rows.append(f"| `{name}` | {shown_default(key)} | {doc} |")
    return "\n".join(rows) + "\n"
