"""A proxy's credentials never show: not in errors, start-up logs nor `config show`, in any
spelling, accepted or refused (#25, defect 11). Every secret here contains "s3cret" or
"T0KEN", and every test checks that neither appears."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tensorferry.cli import main as cli_main
from tensorferry.daemon.config.settings import S3Settings, load_settings
from tensorferry.daemon.store.proxy import ProxyChooser, redact
from tensorferry.daemon.store.s3 import S3Backend
from tensorferry.errors import ConfigError

SECRETS = ("s3cret", "T0KEN")
EXPECTED = "expected a proxy URL such as http://proxy.internal:3128, got"
WHY = "(proxies are spoken to in plain HTTP; https stores are tunnelled with CONNECT)"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("http://svc:s3cret@proxy:3128", "http://***@proxy:3128"),
        ("svc:s3cret@proxy:3128", "***@proxy:3128"),  # accepted without a scheme
        ("http://T0KEN@proxy:3128", "http://***@proxy:3128"),  # a token as the user name
        ("T0KEN@proxy:3128", "***@proxy:3128"),
        ("http://svc:s3c@ret@proxy:3128", "http://***@proxy:3128"),  # "@" in the password
        ("HTTP://svc:s3cret@proxy:3128/", "HTTP://***@proxy:3128/"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("proxy:3128", "proxy:3128"),
    ],
)
def test_redact_masks_the_whole_userinfo(value: str, shown: str) -> None:
    assert redact(value) == shown
    assert_no_secret(redact(value))


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("https://svc:s3cret@proxy:443", "https://***@proxy:443"),
        ("socks5://T0KEN@proxy:1080", "socks5://***@proxy:1080"),
        ("http://svc:s3cret@proxy:3128/path", "http://***@proxy:3128/path"),
        ("http://svc:s3/cret@proxy:3128", "http://***@proxy:3128"),  # "/" ends the host early
        ("svc:s3cret@proxy:port", "***@proxy:port"),
        ("svc:s3cret@[::1", "***@[::1"),  # urlsplit itself refuses it
        (" svc:s3:cret@proxy:3128/x", " ***@proxy:3128/x"),
    ],
)
def test_a_refused_proxy_url_is_quoted_without_its_credentials(value: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        S3Settings(proxy=value)
    assert info.value.message == f"s3.proxy: {EXPECTED} {shown!r} {WHY}"
    chooser_env = {"https_proxy": value}
    with pytest.raises(ConfigError) as info:
        ProxyChooser(None, chooser_env)
    assert info.value.message == f"$HTTPS_PROXY (or $https_proxy): {EXPECTED} {shown!r} {WHY}"
    assert_no_secret(info.value.message)


def test_a_proxy_that_is_no_string_is_not_quoted(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[sources]\nallow = ["s3://m/"]\n[s3]\nproxy = ["http://T0KEN@p:1"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.message == (
        "s3.proxy: expected a proxy URL string such as http://proxy.internal:3128, got a list"
    )


def test_serve_refuses_a_bad_proxy_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[sources]\nallow = ["s3://m/"]\n[s3]\nproxy = "https://svc:s3cret@p:1"\n')
    assert cli_main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"tensorferry serve: s3.proxy: {EXPECTED} 'https://***@p:1' {WHY}\n"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("svc:s3cret@p:1", "***@p:1"),
        ("http://T0KEN@p:1", "http://***@p:1"),
        ("http://svc:s3cret@p:1", "http://***@p:1"),
    ],
)
def test_config_show_masks_every_accepted_spelling(
    value: str, shown: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[sources]\nallow = ["s3://m/"]\n[s3]\nproxy = "{value}"\n')
    assert cli_main(["config", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f'"proxy": "{shown}"' in out
    assert_no_secret(out)


def test_settings_repr_leaves_the_proxy_out() -> None:
    assert_no_secret(repr(S3Settings(proxy="http://svc:s3cret@p:1")))


async def test_the_start_up_line_names_proxies_without_credentials(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "svc:s3cret@proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://T0KEN@cache:8080")
    monkeypatch.setenv("NO_PROXY", "s3.internal")
    settings = S3Settings(endpoint_url="http://s3.example:8333", region="us-east-1")
    caplog.set_level(logging.INFO, logger="tensorferry.daemon.store.s3")
    async with S3Backend(settings):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "tensorferry.daemon.store.s3"]
    assert lines == [
        "http stores through http://cache:8080; https stores through http://proxy:3128 "
        "(from the environment; NO_PROXY: s3.internal); direct fallback on"
    ]
    assert_no_secret(caplog.text)
    # A bad variable stops the start, quoted without its credentials.
    monkeypatch.setenv("HTTP_PROXY", "ftp://T0KEN@cache:8080")
    with pytest.raises(ConfigError) as info:
        S3Backend(settings)
    assert info.value.message == (
        f"$HTTP_PROXY (or $http_proxy): {EXPECTED} 'ftp://***@cache:8080' {WHY}"
    )
