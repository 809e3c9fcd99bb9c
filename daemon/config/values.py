"""Parsers and rules for configuration values, named in the schema (``config_keys.KEYS``).

A parser turns a TOML value into the setting's type, or raises ConfigError naming the key:
``(value, "s3.concurrency") -> int``. A rule checks a parsed value and returns what is wrong
with it ("must be 1..1024, got 0") or None; ``config_keys.check`` prefixes the key. Rules
run whenever a settings object is built, so values set in code are held to them too.
"""

from __future__ import annotations

import grp
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorferry.cuda import FakeDevice, normalize_uuid
from tensorferry.errors import ConfigError, InvalidRequest

Parse = Callable[[Any, str], Any]
Rule = Callable[[Any], str | None]

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a string such as "8MiB" or "16 GiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ConfigError(f"{key}: expected a byte size such as 8MiB or 16GiB, got {value!r}")


def size_text(size: int) -> str:
    """``8388608`` as "8MiB": the largest binary unit that divides it."""
    for unit, factor in _BINARY:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def integer(value: object, key: str) -> int:
    # Strings and whole floats were read with int() before the schema; they still are.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def integer_or_auto(value: object, key: str) -> int:
    """An integer, or "auto" (0): derived at start."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        return integer(value, key)
    except ConfigError:
        raise ConfigError(f'{key}: expected an integer or "auto", got {value!r}') from None


#: ``count_or_auto``'s "auto": derived at start (0 is a count like any other: none).
AUTO = -1


def count_or_auto(value: object, key: str) -> int:
    """A count, 0 included, or "auto" (``AUTO``)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO
    try:
        return integer(value, key)
    except ConfigError:
        raise ConfigError(f'{key}: expected an integer or "auto", got {value!r}') from None


def number(value: object, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def boolean(value: object, key: str) -> bool:
    # bool("false") is True: a quoted "false" must not switch the allowlist off.
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def text(value: object, key: str) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def optional_text(value: object, key: str) -> str | None:
    """A string; "" means unset, as it did when the file was read with ``or``."""
    return text(value, key) or None


def optional_path(value: object, key: str) -> Path | None:
    shown = optional_text(value, key)
    return Path(shown) if shown is not None else None


def octal(value: object, key: str) -> int:
    try:
        return int(text(value, key), 8)
    except ValueError:
        raise ConfigError(
            f'{key}: expected octal permission bits such as "660", got {value!r}'
        ) from None


def strings(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(text(item, key) for item in value)
    raise ConfigError(f"{key}: expected an array of strings, got {value!r}")


#: Headers the data path sets itself, or that a presigned URL did not sign (S3 refuses
#: unsigned x-amz-* headers): a per-source table may not name them.
_OWN_HEADERS = {"host", "range", "if-match", "authorization", "proxy-authorization",
                "connection", "content-length", "transfer-encoding", "te", "upgrade"}  # fmt: skip
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

Headers = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


def header_tables(value: object, key: str) -> Headers:
    """``[s3.headers."s3://bucket/prefix/"]`` tables of header = "value", as (prefix,
    ((name, value), ...)) pairs."""
    if not isinstance(value, dict):
        raise ConfigError(f'{key}: expected tables such as [{key}."s3://bucket/prefix/"]')
    tables = []
    for prefix, headers in value.items():
        if not isinstance(headers, dict):
            raise ConfigError(f'{key}.{prefix!r}: expected a table of header = "value"')
        pairs = tuple((str(n), text(v, f"{key}.{prefix!r}.{n}")) for n, v in headers.items())
        tables.append((str(prefix), pairs))
    return tuple(tables)


def headers_rule(tables: Headers) -> str | None:
    for prefix, pairs in tables:
        if not prefix.startswith("s3://") or not prefix[5:].split("/", 1)[0]:
            return f"{prefix!r} is not an s3://bucket/prefix/ source"
        for name, value in pairs:
            lower = name.lower()
            if not _TOKEN.fullmatch(name) or lower in _OWN_HEADERS or lower.startswith("x-amz-"):
                return f"{prefix!r}: the header {name!r} cannot be set here"
            if "\r" in value or "\n" in value:
                return f"{prefix!r}: the value of {name!r} has a line break"
    return None


def fake_devices(value: object, key: str) -> tuple[FakeDevice, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
    return tuple(_fake_device(entry, key) for entry in value)


def _fake_device(entry: object, key: str) -> FakeDevice:
    if not isinstance(entry, dict) or "uuid" not in entry:
        raise ConfigError(f"{key}: each entry needs a uuid")
    try:
        gpu_uuid = normalize_uuid(str(entry["uuid"]))
    except ValueError:
        raise ConfigError(
            f"{key}: {entry['uuid']!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-...)"
        ) from None
    memory = parse_size(entry.get("memory", 1 << 30), f"{key}.memory")
    node = integer(entry.get("numa_node", -1), f"{key}.numa_node")
    return FakeDevice(gpu_uuid, memory, str(entry.get("pci_bus_id", "")), node)


def between(
    low: int, high: int, *, sizes: bool = False, or_zero: bool = False, or_auto: bool = False
) -> Rule:
    """``low..high`` inclusive (``or_zero``: 0 too, meaning "derive it"; ``or_auto``:
    ``AUTO`` too)."""
    shown = f"{size_text(low)}..{size_text(high)}" if sizes else f"{low}..{high}"

    def rule(value: int) -> str | None:
        if (or_zero and value == 0) or (or_auto and value == AUTO) or low <= value <= high:
            return None
        return f"must be {shown}, got {value}"

    return rule


def at_least(low: int) -> Rule:
    return lambda value: None if value >= low else f"must be {low} or more, got {value}"


def one_of(*allowed: str) -> Rule:
    return lambda value: (
        None if value in allowed else f"must be one of {', '.join(allowed)}, got {value!r}"
    )


def addressing_style(value: str) -> str | None:
    if value in ("auto", "path", "virtual"):
        return None
    return f"must be auto, path or virtual, got {value!r}"


def host_port(value: str) -> str | None:
    return None if ":" in value else f"expected host:port, got {value!r}"


def loopback(listen: str) -> str | None:
    """host:port on a loopback address (metrics are no API: they stay on the host)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = host == "localhost"
    return None if is_loopback and port.isdigit() else f"{listen} is not a loopback host:port"


def is_file(path: Path) -> str | None:
    return None if path.is_file() else f"{path} does not exist"


def socket_length(path: Path) -> str | None:
    if len(str(path).encode()) > 107:
        return f"Unix socket paths are limited to 107 bytes, got {path}"
    return None


def group_exists(name: str) -> str | None:
    try:
        grp.getgrnam(name)
    except KeyError:
        return f"no such group {name!r}"
    return None


def allow_entries(entries: tuple[str, ...]) -> str | None:
    for entry in entries:
        try:
            normalize_allow_entry(entry)
        except InvalidRequest as exc:
            return exc.message
    return None


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
