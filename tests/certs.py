"""Throwaway certificates for the TLS tests, made with `cryptography`.

`make_pki(dir)` writes a CA, a server certificate for 127.0.0.1/localhost
(used by every server in a test), a client certificate signed by the same
CA, a client certificate from a second, untrusted CA, and `client.pem`
(client certificate + key in one file, the form HAProxy's `crt` wants).
EC P-256 keys keep generation fast.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_pem: Path  # certificate + key, for HAProxy `crt`
    rogue_cert: Path  # signed by a CA nobody trusts
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common_name: str):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, common_name: str, usage, sans: list[x509.GeneralName]):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("sutra-test-ca")
    server_key, server_cert = _leaf(ca_key, ca_cert, "sutra-server", ExtendedKeyUsageOID.SERVER_AUTH,
                                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, client_cert = _leaf(ca_key, ca_cert, "sutra-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    rogue_ca_key, rogue_ca_cert = _ca("someone-else-ca")
    rogue_key, rogue_cert = _leaf(rogue_ca_key, rogue_ca_cert, "intruder", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    d = directory
    pki = Pki(
        ca=_write_cert(ca_cert, d / "ca.crt"),
        server_cert=_write_cert(server_cert, d / "server.crt"), server_key=_write_key(server_key, d / "server.key"),
        client_cert=_write_cert(client_cert, d / "client.crt"), client_key=_write_key(client_key, d / "client.key"),
        client_pem=d / "client.pem",
        rogue_cert=_write_cert(rogue_cert, d / "rogue.crt"), rogue_key=_write_key(rogue_key, d / "rogue.key"),
    )
    pki.client_pem.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    return pki
