"""Which requests take a proxy, what a proxy's own error looks like, and the config keys
that set them (#19). The wire behaviour, through a real proxy, is in test_proxy.py."""

from __future__ import annotations

import pytest

from tensorferry import env
from tensorferry.cli import main as cli_main
from tensorferry.daemon.config.settings import S3Settings, load_settings
from tensorferry.daemon.store.proxy import (
    Proxy,
    ProxyChooser,
    bypass,
    parse_proxy,
    proxy_error,
    redact,
)
from tensorferry.errors import ConfigError
from tests.conftest import short_dir


def test_a_proxy_url_is_parsed_and_its_credentials_never_shown() -> None:
    proxy = parse_proxy("http://svc:s%40cret@proxy.internal:3128", "s3.proxy")
    assert (proxy.host, proxy.port, proxy.shown) == (
        "proxy.internal",
        3128,
        "http://proxy.internal:3128",
    )
    assert proxy.authorization == "Basic c3ZjOnNAY3JldA=="  # svc:s@cret
    assert "cret" not in repr(proxy)
    assert parse_proxy("10.0.0.1:65001", "x") == Proxy("10.0.0.1", 65001)
    with pytest.raises(ConfigError) as info:
        parse_proxy("https://proxy:443", "$HTTPS_PROXY (or $https_proxy)")
    assert info.value.message == (
        "$HTTPS_PROXY (or $https_proxy): expected a proxy URL such as "
        "http://proxy.internal:3128, got 'https://proxy:443' (proxies are spoken to in plain "
        "HTTP; https stores are tunnelled with CONNECT)"
    )


@pytest.mark.parametrize(
    ("host", "port", "entries", "exempt"),
    [
        ("s3.amazonaws.com", 443, ["*"], True),
        ("bucket.s3.amazonaws.com", 443, [".amazonaws.com"], True),
        ("bucket.s3.amazonaws.com", 443, ["amazonaws.com"], True),
        ("notamazonaws.com", 443, ["amazonaws.com"], False),
        ("10.1.2.3", 80, ["10.0.0.0/8"], True),
        ("11.1.2.3", 80, ["10.0.0.0/8"], False),
        ("cache.svc", 8333, ["cache.svc:8333"], True),
        ("cache.svc", 8334, ["cache.svc:8333"], False),
    ],
)
def test_no_proxy_entries(host: str, port: int, entries: list[str], exempt: bool) -> None:
    assert bypass(host, port, entries) is exempt


def test_proxies_from_the_environment_skip_loopback_and_no_proxy_hosts() -> None:
    variables = {"http_proxy": "proxy:3128", "no_proxy": "cache.svc"}
    chooser = ProxyChooser(None, variables)
    assert chooser.for_url("http://s3.internal:8333/b/k") == Proxy("proxy", 3128)
    assert chooser.for_url("https://s3.amazonaws.com/b/k") is None  # no https_proxy
    assert chooser.for_url("http://cache.svc/b/k") is None
    assert chooser.for_url("http://127.0.0.1:8333/b/k") is None
    assert chooser.for_url("http://localhost:8333/b/k") is None
    # A configured proxy is meant for whatever the file names, loopback included...
    configured = ProxyChooser("http://127.0.0.1:3128", variables)
    assert configured.for_url("https://127.0.0.1:8333/b/k") == Proxy("127.0.0.1", 3128)
    # ...and "off" ignores the environment.
    assert not ProxyChooser("off", variables).any


def test_the_environment_is_read_lowercase_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:1")
    monkeypatch.setenv("https_proxy", "http://lower:2")
    monkeypatch.setenv("NO_PROXY", "a,b")
    assert env.proxy_variables() == {"https_proxy": "http://lower:2", "no_proxy": "a,b"}


def test_what_counts_as_the_proxys_own_error() -> None:
    s3_error = b"<Error><Code>SlowDown</Code></Error>"
    assert proxy_error(503, {}, s3_error) is None  # the store's: back off, not around
    assert proxy_error(403, {"x-amz-request-id": "1"}, b"") is None
    assert proxy_error(502, {}, b"<html>Bad Gateway</html>") == "HTTP 502, not an S3 answer"
    assert proxy_error(200, {}, b"") == "HTTP 200, not an S3 answer"  # a range ignored
    assert proxy_error(500, {"x-dragonfly-error-type": "source"}, s3_error) == (
        "Dragonfly error source (HTTP 500)"
    )
    assert proxy_error(407, {}, b"") == (
        "HTTP 407: the proxy wants credentials (put them in its URL)"
    )


def test_config_show_keeps_the_proxy_password_out(capsys: pytest.CaptureFixture[str]) -> None:
    # The user name goes too: it may be a token (#25).
    assert redact("http://svc:s3cret@proxy:3128") == "http://***@proxy:3128"
    assert redact("http://proxy:3128") == "http://proxy:3128"
    config = short_dir() / "c.toml"
    config.write_text('[sources]\nallow = ["s3://m/"]\n[s3]\nproxy = "http://svc:s3cret@p:1"\n')
    assert cli_main(["config", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert '"proxy": "http://***@p:1"' in out
    assert "s3cret" not in out


def test_proxy_headers_and_ca_bundle_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    config = short_dir() / "c.toml"
    config.write_text(
        '[sources]\nallow = ["s3://models/"]\n[s3]\nproxy = "http://127.0.0.1:65001"\n'
        'proxy_fallback = false\n[s3.headers."s3://models/llama/"]\nX-Dragonfly-Tag = "llama"\n'
    )
    s3 = load_settings(config).s3
    assert (s3.proxy, s3.proxy_fallback) == ("http://127.0.0.1:65001", False)
    assert s3.headers == (("s3://models/llama/", (("X-Dragonfly-Tag", "llama"),)),)
    assert s3.ca_bundle is None
    monkeypatch.setenv("AWS_CA_BUNDLE", str(config))
    assert load_settings(config).s3.ca_bundle == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proxy": "socks5://p:1080"},
         "s3.proxy: expected a proxy URL such as http://proxy.internal:3128, got "
         "'socks5://p:1080' (proxies are spoken to in plain HTTP; https stores are tunnelled "
         "with CONNECT)"),
        ({"headers": (("s3://m/", (("Range", "bytes=0-1"),)),)},
         "s3.headers: 's3://m/': the header 'Range' cannot be set here"),
        ({"headers": (("s3://m/", (("x-amz-acl", "public"),)),)},
         "s3.headers: 's3://m/': the header 'x-amz-acl' cannot be set here"),
        ({"headers": (("/models/", (("X-Tag", "a"),)),)},
         "s3.headers: '/models/' is not an s3://bucket/prefix/ source"),
        ({"headers": (("s3://m/", (("X-Tag", "a\r\nInjected: 1"),)),)},
         "s3.headers: 's3://m/': the value of 'X-Tag' has a line break"),
    ],
)  # fmt: skip
def test_bad_proxy_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        S3Settings(**kwargs)  # type: ignore[arg-type]
    assert info.value.message == message
