"""Access to the daemon: socket group, gRPC over TCP only with TLS (client certificates)."""

from __future__ import annotations

import datetime
import grp
import ipaddress
import os
import socket
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tensorferry.client import Client, DaemonNotRunning, TlsConfig
from tensorferry.devtools.modelgen import write_model
from tensorferry.devtools.seaweed import S3Server
from tensorferry.v1 import tensorferry_pb2 as pb
from tensorferry.v1 import tensorferry_pb2_grpc as pb_grpc
from tests.conftest import BUCKET, SHM, daemon_env, running_daemon, serve_refused, upload

Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None, ca: bool = False
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("tensorferry test CA", ca_key, None, ca=True)
    out: dict[str, bytes] = {"ca": _pem(ca)}
    for who in ("server", "worker"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[who] = _pem(_cert(who, key, (ca.subject, ca_key)))
        out[f"{who}_key"] = _pem(key)
    for name, data in out.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    return out


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
