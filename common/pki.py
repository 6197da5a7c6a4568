"""A certificate authority small enough to own: issue a CA and the leaf certificates signed by it.

Why here and not openssl on the command line: `sutra up` makes a stack-local CA for mutual TLS
between its own processes, the tests make throwaway ones (and a rogue CA nobody trusts), and both
need the same certificates: EC P-256 keys (fast to make), a common name that says who holds the
certificate (the services authorize callers by it, see common/peers.py), the extended key usage
that says which side of a handshake it is for, and the host names and addresses a server answers
on. Private keys are written mode 600 from the start, never readable for a moment by others.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def common_name(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def expires_within(self, delta: datetime.timedelta) -> bool:
        return self.cert.not_valid_after_utc - delta < datetime.datetime.now(datetime.timezone.utc)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem())
        write_private(key_path, self.key_pem())

    @classmethod
    def read(cls, cert_path: Path, key_path: Path) -> "Issued":
        return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()),
                   serialization.load_pem_private_key(key_path.read_bytes(), password=None))


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a file created with mode 600 (an existing file is truncated and re-moded)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key, days: float) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))


def issue_ca(common_name: str, days: float) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    """SAN entries for a server's host names and addresses."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(ca: Issued, common_name: str, usage, days: float, hosts: list[str] = ()) -> Issued:
    """A leaf certificate for `common_name`, for `usage` (SERVER or CLIENT), answering on `hosts`."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(common_name, ca.cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(subject_names(list(hosts))), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)
