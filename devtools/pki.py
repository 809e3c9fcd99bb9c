"""A throwaway certificate authority for tests: a CA and leaf certificates for
``localhost``/``127.0.0.1``, written as PEM files (gRPC over TLS, https stores)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]


def certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None, ca: bool = False
) -> x509.Certificate:
    """A day-long certificate; leaves (``ca`` False) name localhost and 127.0.0.1."""
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


def pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


def make_pki(directory: Path, leaves: tuple[str, ...] = ("server",)) -> dict[str, bytes]:
    """``ca`` and, per leaf, ``NAME`` and ``NAME_key`` PEMs, also written as
    ``directory/NAME.pem``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("tensorferry test CA", ca_key, None, ca=True)
    out: dict[str, bytes] = {"ca": pem(ca)}
    for who in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        out[who] = pem(certificate(who, key, (ca.subject, ca_key)))
        out[f"{who}_key"] = pem(key)
    for name, data in out.items():
        (directory / f"{name}.pem").write_bytes(data)
    return out
