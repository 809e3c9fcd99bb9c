"""Forward proxies on the data path: which range GETs go through one, and what its own
errors look like.

A proxy comes from ``[s3] proxy`` or, when that is unset, from the standard variables
(``HTTPS_PROXY`` for https stores, ``HTTP_PROXY`` for http ones; ``NO_PROXY`` exempts hosts
either way, as curl does). Through it, an ``http`` store is asked with absolute URIs, so
a caching proxy or Dragonfly's dfdaemon sees (and can serve) every range; an ``https``
store is reached through a CONNECT tunnel with TLS to the store inside it. A proxy from the
environment skips loopback stores (as Go's ``ProxyFromEnvironment`` does): a variable set
for a host's package downloads must not reroute a local store.

A proxy that answers with an error of its own (Dragonfly's ``X-Dragonfly-Error-Type``, an
error without S3's error body, or no connection at all) is not the store's verdict: with
``[s3] proxy_fallback`` the range is asked of the store directly (``_http`` does that, and
counts it).
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping

from tensorferry.errors import ConfigError

#: ``[s3] proxy`` value that turns proxies off even where the environment names one.
OFF = "off"


class ProxyFailed(Exception):
    """The proxy, not the store, failed this request; the message names the proxy."""


@dataclasses.dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    #: ``Proxy-Authorization`` for credentials in the proxy's URL, else None.
    authorization: str | None = dataclasses.field(default=None, repr=False)
    #: The URL as configured, credentials included (for botocore's control calls).
    url: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def shown(self) -> str:
        """The proxy for messages and logs: never its credentials."""
        return f"http://{self.host}:{self.port}"


def parse_proxy(url: str, where: str) -> Proxy:
    """``http://[user:password@]host[:port]`` (a bare ``host:port`` too); ConfigError names
    ``where`` (the key or variable the value came from) and shows the value ``redact``ed."""
    value = url.strip()
    try:
        parts = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
        port = parts.port or 80
    except ValueError:  # an unclosed "[", a port that is no number or out of range
        parts, port = urllib.parse.urlsplit(""), -1
    if parts.scheme != "http" or not parts.hostname or port < 1 or parts.path not in ("", "/"):
        raise ConfigError(
            f"{where}: expected a proxy URL such as http://proxy.internal:3128, got "
            f"{redact(url)!r} (proxies are spoken to in plain HTTP; https stores are tunnelled "
            "with CONNECT)"
        )
    auth = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return Proxy(parts.hostname, port, auth, parts.geturl())


#: A URL's scheme and "//", where the value has them (leading blanks kept as they were).
_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")


def redact(value: str) -> str:
    """A proxy setting as messages, logs and ``config show`` may show it: everything
    before the last "@" (after the scheme, if any) becomes ``***``. The whole userinfo goes,
    not only a password: a user name alone is often a token. Taken from the raw text
    rather than from a parsed URL, so malformed values (a "/" or "@" in the password, no
    scheme, no port) are masked as well as valid ones."""
    scheme = _SCHEME.match(value)
    head = scheme.end() if scheme else len(value) - len(value.lstrip())
    at = value.rfind("@", head)
    return value if at < 0 else f"{value[:head]}***{value[at:]}"


def proxy_text(value: object, key: str) -> str | None:
    """The parser of ``[s3] proxy``: a string ("" is unset). Anything else is refused
    without quoting it: it may hold credentials."""
    if isinstance(value, str):
        return value or None
    raise ConfigError(
        f"{key}: expected a proxy URL string such as http://proxy.internal:3128, got a "
        f"{type(value).__name__}"
    )


def proxy_rule(value: str | None) -> str | None:
    """The config rule of ``[s3] proxy``."""
    if value is None or value == OFF:
        return None
    try:
        parse_proxy(value, "s3.proxy")
    except ConfigError as exc:
        return exc.message.removeprefix("s3.proxy: ")
    return None


class ProxyChooser:
    """The proxy for each store host, decided once per (scheme, host, port)."""

    def __init__(self, setting: str | None, variables: Mapping[str, str]) -> None:
        self._by_scheme: dict[str, Proxy | None] = {"http": None, "https": None}
        self._from_env = setting is None
        if setting == OFF:
            pass
        elif setting is not None:
            proxy = parse_proxy(setting, "s3.proxy")
            self._by_scheme = {"http": proxy, "https": proxy}
        else:
            for scheme in ("http", "https"):
                name = f"{scheme}_proxy"
                if variables.get(name):
                    where = f"${name.upper()} (or ${name})"
                    self._by_scheme[scheme] = parse_proxy(variables[name], where)
        self._exempt = [e.strip().lower() for e in variables.get("no_proxy", "").split(",")]
        self._exempt = [e for e in self._exempt if e]
        self._cache: dict[tuple[str, str, int], Proxy | None] = {}

    @property
    def any(self) -> bool:
        return any(p is not None for p in self._by_scheme.values())

    def describe(self) -> str:
        """What an operator should see at start: which stores go through which proxy."""
        routes = [f"{scheme} stores through {p.shown}" for scheme, p in self._by_scheme.items()
                  if p is not None]  # fmt: skip
        source = "environment" if self._from_env else "[s3] proxy"
        exempt = f"; NO_PROXY: {', '.join(self._exempt)}" if self._exempt else ""
        return f"{'; '.join(routes)} (from the {source}{exempt})"

    def for_host(self, scheme: str, host: str, port: int) -> Proxy | None:
        key = (scheme, host, port)
        if key not in self._cache:
            proxy = self._by_scheme.get(scheme)
            exempt = proxy is not None and (
                bypass(host, port, self._exempt) or (self._from_env and _loopback(host))
            )
            self._cache[key] = None if exempt else proxy
        return self._cache[key]

    def for_url(self, url: str) -> Proxy | None:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return self.for_host(parts.scheme, parts.hostname or "", port)


def _loopback(host: str) -> bool:
    host = host.lower().strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def bypass(host: str, port: int, entries: list[str]) -> bool:
    """Whether ``NO_PROXY`` entries exempt ``host``: ``*``, a name and its subdomains
    (``example.com``, ``.example.com``), an address or a CIDR block, each with an optional
    ``:port``."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        name, sep, entry_port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        if not sep:
            name = entry
        elif entry_port != str(port):
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def proxy_error(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """Why a non-206 answer came from the proxy rather than the store, or None when the
    store gave it. S3 errors carry an XML ``<Code>`` or a request id; those are the
    store's verdict (a 503 SlowDown must slow us down, not send us around the proxy).
    Anything else (an error page, a 200 that ignored the range) is the proxy's: the
    store, asked directly, gives the real answer at the cost of one request."""
    kind = headers.get("x-dragonfly-error-type")
    if kind is not None:
        return f"Dragonfly error {kind} (HTTP {status})"
    if b"<Code>" in body or "x-amz-request-id" in headers:
        return None
    if status == 407:
        return "HTTP 407: the proxy wants credentials (put them in its URL)"
    return f"HTTP {status}, not an S3 answer"
