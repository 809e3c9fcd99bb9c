"""Access to the daemon: socket group, gRPC over TCP only with TLS (client certificates)."""

from __future__ import annotations

import grp
import os
import socket
from pathlib import Path

import grpc
import pytest

from tensorferry.client import Client, DaemonNotRunning, TlsConfig
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.pki import make_pki
from tensorferry.devtools.seaweed import S3Server
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests.conftest import BUCKET, SHM, daemon_env, running_daemon, serve_refused, upload


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes]:
    return make_pki(tmp_path, ("server", "worker"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_only_with_tls_and_client_certificates(
    s3: S3Server, tmp_path: Path, prefix: str, pki: dict[str, bytes]
) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    address = f"127.0.0.1:{free_port()}"
    tcp = (
        f'[tcp]\nlisten = "{address}"\ncert = "{tmp_path}/server.pem"\n'
        f'key = "{tmp_path}/server_key.pem"\nclient_ca = "{tmp_path}/ca.pem"\n'
    )
    with running_daemon(daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config=tcp):
        tls = TlsConfig(pki["ca"], pki["worker_key"], pki["worker"])
        with Client(tcp=address, tls=tls) as client, client.load(uri) as model:
            assert model.tensors
        plain = grpc.insecure_channel(address)
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LoaderStub(plain).List(pb.ListRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        plain.close()
        no_cert = TlsConfig(pki["ca"])
        with Client(tcp=address, tls=no_cert) as client, pytest.raises(DaemonNotRunning):
            client.list()  # the handshake fails: no usable connection


def test_tcp_without_tls_refuses_to_start(s3: S3Server) -> None:
    stderr, _ = serve_refused(
        f'[sources]\nallow = ["s3://{BUCKET}/"]\n[tcp]\nlisten = "127.0.0.1:7443"\n',
        daemon_env(s3),
    )
    assert stderr == (
        "tensorferry serve: tcp: gRPC over TCP needs TLS: set [tcp] cert and key (plaintext "
        "TCP is refused)"
    )


def test_socket_group_owns_socket_and_arenas(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    write_model(tmp_path / "m", 1 << 20, layer_bytes=1 << 19)
    uri = upload(s3, tmp_path / "m", prefix)
    gid = grp.getgrnam("nogroup").gr_gid
    group = 'socket_group = "nogroup"\n'
    # Top-level keys must precede the tables: put it first through extra_config's file.
    with running_daemon(
        daemon_env(s3), allow=[f"s3://{BUCKET}/"], extra_config="", prelude=group
    ) as d:
        assert os.stat(d.socket).st_gid == gid
        assert oct(os.stat(d.socket).st_mode & 0o777) == "0o660"
        with d.client() as client, client.load(uri):
            (segment,) = d.segments()
            st = os.stat(SHM / segment)
            assert st.st_gid == gid
            assert oct(st.st_mode & 0o777) == "0o440"
