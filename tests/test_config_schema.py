"""The configuration schema: each key's default, parser and rule defined once, and every
consumer (settings dataclasses, the reader, the unknown-key check, the docs) derived from it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tensorferry.daemon.config.settings
from tensorferry.cli import main as cli_main
from tensorferry.daemon.config.keys import KEYS, Key, shown_default
from tensorferry.daemon.config.settings import (
    Limits,
    S3Settings,
    Settings,
    TcpSettings,
    load_s3_settings,
    load_settings,
)
from tensorferry.daemon.fetch.retries import FetchPolicy
from tensorferry.daemon.gpu.settings import CudaSettings
from tensorferry.errors import ConfigError, TensorferryError

ROOT = Path(__file__).resolve().parent.parent
#: Settings fields that are no config key: nested sections, and where arenas live.
STRUCTURAL = {"tcp", "s3", "limits", "cuda", "shm_dir"}


def owner(key: Key) -> type[Any]:
    by_section = {"s3": S3Settings, "limits": Limits, "cuda": CudaSettings, "tcp": TcpSettings}
    return by_section.get(key.section, Settings)


def test_the_docs_table_is_generated_from_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # And, read back without the generator: exactly the schema's keys, with its defaults.
    doc = (ROOT / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| .* \|$", doc, re.MULTILINE)
    documented = {name: shown for name, shown in rows}
    assert len(rows) == len(documented) == len(KEYS)
    assert documented == {
        (f"[{k.section}] {k.name}" if k.section else k.name): shown_default(k) for k in KEYS
    }


def test_the_settings_dataclasses_take_their_defaults_from_the_schema() -> None:
    for key in KEYS:
        fields = {f.name: f for f in dataclasses.fields(owner(key))}
        assert key.attr in fields, key.dotted
        field = fields[key.attr]
        if field.default is dataclasses.MISSING:  # [tcp] listen, cert, key: required there
            assert key.section == "tcp", key.dotted
            assert key.default is None, key.dotted
        else:
            assert field.default == key.default, key.dotted
    for cls in (Settings, S3Settings, Limits, CudaSettings, TcpSettings):
        keyed = {k.attr for k in KEYS if owner(k) is cls}
        assert {f.name for f in dataclasses.fields(cls)} - STRUCTURAL == keyed, cls.__name__


def test_an_empty_file_gives_the_schemas_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    settings = load_settings(config, socket="/tmp/tf.sock")
    assert settings.s3 == S3Settings(endpoint_url=settings.s3.endpoint_url)
    assert settings.limits == Limits()
    assert settings.cuda == CudaSettings()
    assert settings.tcp is None
    assert settings.recycle_bytes == 4 << 30
    assert settings.cache_budget == 100 << 30


def test_fetch_policy_defaults_are_the_s3_sections() -> None:
    policy, s3 = FetchPolicy(), S3Settings()
    assert (policy.attempts, policy.budget, policy.range_deadline) == (
        s3.attempts, s3.retry_budget, s3.range_deadline
    )  # fmt: skip


def test_config_error_joined_the_hierarchy() -> None:
    assert issubclass(ConfigError, TensorferryError)
    assert issubclass(ConfigError, ValueError)  # what callers caught before
    assert tensorferry.daemon.config.settings.ConfigError is ConfigError


def test_an_old_key_name_is_still_read(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[limits]\nmax_concurrent_rpcs = 3\n")
    assert load_settings(config).limits.max_leases == 3
    config.write_text("[limits]\nmax_leases = 5\nmax_concurrent_rpcs = 3\n")
    assert load_settings(config).limits.max_leases == 5


def test_a_misspelt_top_level_key_names_the_closest(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[cudaa]\napi = "off"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.message == (
        f"config file {config}: unknown key 'cudaa' in the top level; did you mean 'cuda'?"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[s3]\nconcurrency = "many"', "s3.concurrency: expected an integer, got 'many'"),
        ('[s3]\nchunk_size = "1KiB"', "s3.chunk_size: must be 64KiB..1GiB, got 1024"),
        ('[s3]\naddressing_style = "dns"',
         "s3.addressing_style: must be auto, path or virtual, got 'dns'"),
        ('[s3]\nread_timeout = "soon"', "s3.read_timeout: expected a number, got 'soon'"),
        ('[sources]\nallow_any = "false"',
         "sources.allow_any: expected true or false, got 'false'"),
        ('[sources]\nallow = ["models"]',
         "sources.allow: 'models' is neither an s3:// prefix nor an absolute directory"),
        ('preload = "s3://b/m/"', "preload: expected an array of strings, got 's3://b/m/'"),
        ('socket_mode = "rw"', "socket_mode: expected octal permission bits such as \"660\", "
         "got 'rw'"),
        ('log_format = "xml"', "log_format: must be one of text, json, got 'xml'"),
        ("memory = 3", "[memory]: expected a table"),
        ('[metrics]\nlisten = "0.0.0.0:9100"',
         "metrics.listen: 0.0.0.0:9100 is not a loopback host:port"),
        ('[tcp]\nlisten = "7443"', "tcp.listen: expected host:port, got '7443'"),
        ('[tcp]\nlisten = "127.0.0.1:7443"',
         "tcp: gRPC over TCP needs TLS: set [tcp] cert and key (plaintext TCP is refused)"),
        ('[tcp]\nlisten = "127.0.0.1:7443"\ncert = "/no/cert.pem"\nkey = "/no/key.pem"',
         "tcp.cert: /no/cert.pem does not exist"),
        ('[cuda]\nring_slots = "x"', "cuda.ring_slots: expected an integer or \"auto\", got 'x'"),
        ('[cuda]\nslot_size = "1KiB"', "cuda.slot_size: must be 64KiB..1GiB, got 1024"),
        ("[cuda]\ncopy_streams = 17", "cuda.copy_streams: must be 1..16, got 17"),
        ("[cuda]\nfake_devices = 3",
         "cuda.fake_devices: expected an array of tables ([[cuda.fake_devices]])"),
        ("[[cuda.fake_devices]]\nmemory = 1", "cuda.fake_devices: each entry needs a uuid"),
    ],
)  # fmt: skip
def test_a_bad_value_is_a_config_error_naming_the_key(
    tmp_path: Path, body: str, message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(body + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.message == message


def test_settings_built_in_code_follow_the_same_rules() -> None:
    with pytest.raises(ConfigError) as s3:
        S3Settings(concurrency=0)
    assert s3.value.message == "s3.concurrency: must be 1..1024, got 0"
    with pytest.raises(ConfigError) as cuda:
        CudaSettings(api="rocm")
    assert cuda.value.message == "cuda.api: must be one of auto, cupy, fake, off, got 'rocm'"
    with pytest.raises(ConfigError) as grace:
        Settings(log_format="xml")
    assert grace.value.message == "log_format: must be one of text, json, got 'xml'"


def test_every_command_reports_a_bad_config_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[s3]\nconcurrency = 0\n")
    for argv in (
        ["config", "show", "--config", str(config)],
        ["doctor", "--config", str(config)],
        ["prepare", str(tmp_path / "src"), str(tmp_path / "dst"), "--config", str(config)],
    ):
        assert cli_main(argv) == 2
        assert capsys.readouterr().err == (
            f"tensorferry {argv[0]}: s3.concurrency: must be 1..1024, got 0\n"
        )


def test_prepare_reaches_the_store_with_the_config_files_s3_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorferry.prepare as prepare_module
    from tensorferry.devtools.modelgen import write_model

    seen: list[S3Settings] = []

    class Recorder:
        def __init__(self, settings: S3Settings) -> None:
            seen.append(settings)

        async def __aenter__(self) -> Recorder:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    config = tmp_path / "c.toml"
    config.write_text('[s3]\nendpoint_url = "http://127.0.0.1:9"\nconcurrency = 7\n')
    assert load_s3_settings(config) == S3Settings(endpoint_url="http://127.0.0.1:9", concurrency=7)
    monkeypatch.setattr(prepare_module, "S3Backend", Recorder)
    argv = ["prepare", str(tmp_path / "m"), str(tmp_path / "out"), "-q", "--config", str(config)]
    assert cli_main(argv) == 0
    assert [(s.endpoint_url, s.concurrency) for s in seen] == [("http://127.0.0.1:9", 7)]
