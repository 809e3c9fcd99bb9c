"""https stores end to end (#26): SeaweedFS's own TLS with a throwaway CA, a daemon trusting
it through ``[s3] ca_bundle``; for the faults a real store does not make, a TLS terminator
(TlsRelay) in front of a CountingProxy in front of the same SeaweedFS, which drops the TLS
stream without close_notify when the CountingProxy cuts an answer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.pki import make_pki
from tensorferry.devtools.proxy import CountingProxy, Fault, Kind, RequestInfo
from tensorferry.devtools.tls_relay import TlsRelay
from tensorferry.devtools.tls_store import TlsStore
from tensorferry.errors import FailedPrecondition
from tests.conftest import assert_clean, assert_same_tensors, daemon_env, running_daemon
from tests.conftest import upload as upload_model

CHUNK = 1 << 20


@pytest.fixture
def model(s3_tls: TlsStore, tmp_path: Path, prefix: str) -> tuple[str, dict[str, torch.Tensor]]:
    write_model(tmp_path / "m", 6 << 20, shards=2, layer_bytes=1 << 20)
    want: dict[str, torch.Tensor] = {}
    for path in sorted((tmp_path / "m").glob("*.safetensors")):
        want.update(load_file(path))
    return upload_model(s3_tls.plain, tmp_path / "m", prefix), want


def _config(ca: Path) -> str:
    return f'chunk_size = "1MiB"\nca_bundle = "{ca}"'


def test_a_model_loads_byte_exact_over_https(
    s3_tls: TlsStore, model: tuple[str, dict[str, torch.Tensor]]
) -> None:
    uri, want = model
    env = daemon_env(s3_tls.server)
    assert env["AWS_ENDPOINT_URL"].startswith("https://")
    with (
        running_daemon(env, allow=[uri], s3_config=_config(s3_tls.ca)) as d,
        d.client() as client,
    ):
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        del loaded
        assert_clean(d)


def test_a_store_whose_certificate_does_not_verify_is_refused_naming_ca_bundle(
    s3_tls: TlsStore, model: tuple[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    uri, _ = model
    other = tmp_path / "other-ca"
    other.mkdir()
    make_pki(other)
    with (
        running_daemon(
            daemon_env(s3_tls.server), allow=[uri], s3_config=_config(other / "ca.pem")
        ) as d,
        d.client() as client,
        pytest.raises(FailedPrecondition) as info,
    ):
        client.load(uri)
    assert str(info.value) == (
        f"{uri}: the store's TLS certificate does not verify against the CAs in "
        f"{other / 'ca.pem'} (certificate signature failure): set [s3] ca_bundle "
        "(or $AWS_CA_BUNDLE) to the PEM bundle of the CA that signed it"
    )


def _first_data_gets(fault: Fault, times: int) -> Callable[[RequestInfo], Fault | None]:
    def hook(info: RequestInfo) -> Fault | None:
        if info.kind is Kind.DATA_GET and hook.fired < times:  # type: ignore[attr-defined]
            hook.fired += 1  # type: ignore[attr-defined]
            return fault
        return None

    hook.fired = 0  # type: ignore[attr-defined]
    return hook


@pytest.mark.parametrize(
    "fault",
    [Fault(reset_after=CHUNK // 2 + 7), Fault(truncate_after=CHUNK // 3)],
    ids=["reset mid-body", "closed mid-body"],
)
def test_a_tls_connection_cut_mid_body_is_retried_and_the_bytes_are_right(
    s3_tls: TlsStore, model: tuple[str, dict[str, torch.Tensor]], fault: Fault
) -> None:
    uri, want = model
    with (
        CountingProxy(s3_tls.plain.endpoint, fault=_first_data_gets(fault, 2)) as faults,
        TlsRelay(faults.endpoint, s3_tls.server_context()) as terminator,
        running_daemon(
            daemon_env(s3_tls.plain, terminator.endpoint), allow=[uri],
            s3_config=_config(s3_tls.ca),
        ) as d,
        d.client() as client,
    ):  # fmt: skip
        assert terminator.endpoint.startswith("https://")
        with client.load(uri) as loaded:
            assert_same_tensors(dict(loaded.tensors), want)
        [record] = client.status().recent_loads
        del loaded
        assert_clean(d)
        stats = faults.stats()
    assert stats.faults_fired == 2
    assert terminator.cut == 2
    assert record.retries == 2
