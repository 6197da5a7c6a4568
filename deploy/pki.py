"""The local stack's certificate authority: who may call whom, and the files that prove it.

`sutra up` makes (once, then reuses) a CA under `<run dir>/tls/` and one certificate per role.
Servers require a client certificate from that CA, and each names the roles it answers
(common/peers.py), so holding some certificate of the stack is not enough:

    role        certificate   may call
    embedding   client        the cache shard; the replicas (through HAProxy, TLS end to end)
    haproxy     client        the replicas' health service only (its checks)
    operator    client        the cache shard (checkpoints, stats) and every health service
    cacheshard  server        -
    mlbase      server        - (one certificate for every replica)

The CA's key never leaves the directory; every private key is mode 600 and the directory 700.
A certificate is issued again when it is missing, unreadable, close to expiry, or (for servers)
does not name the stack's host.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.pki import CLIENT, SERVER, Issued, issue, issue_ca, subject_names, write_private
from common.tls import TlsClientOptions, TlsServerOptions

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)

SERVER_ROLES = ("cacheshard", "mlbase")
CLIENT_ROLES = ("embedding", "haproxy", "operator")
# Who each server answers (health and reflection stay open to every certificate of the CA).
CALLERS = {"cacheshard": ("embedding", "operator"), "mlbase": ("embedding",)}


@dataclass(frozen=True)
class StackPki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def cert(self, role: str) -> Path:
        return self.directory / f"{role}.crt"

    def key(self, role: str) -> Path:
        return self.directory / f"{role}.key"

    def pem(self, role: str) -> Path:
        """Certificate and key in one file, the form HAProxy's `crt` wants."""
        return self.directory / f"{role}.pem"

    def server(self, role: str) -> TlsServerOptions:
        return TlsServerOptions(cert=str(self.cert(role)), key=str(self.key(role)), client_ca=str(self.ca),
                                allowed_clients=CALLERS[role])

    def client(self, role: str) -> TlsClientOptions:
        return TlsClientOptions(ca=str(self.ca), cert=str(self.cert(role)), key=str(self.key(role)))

    def ensure(self, hosts: list[str]) -> list[str]:
        """Make whatever is missing or stale; returns the roles (and "ca") issued now."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        made: list[str] = []
        ca = self._load("ca", self.ca, self.directory / "ca.key")
        if ca is None:
            ca = issue_ca("sutra-stack-ca", CA_DAYS)
            ca.write(self.ca, self.directory / "ca.key")
            made.append("ca")
        hosts = [*hosts, "127.0.0.1", "localhost"]
        for role in (*SERVER_ROLES, *CLIENT_ROLES):
            server = role in SERVER_ROLES
            current = None if "ca" in made else self._load(role, self.cert(role), self.key(role))
            if current is not None and server and not _names_hosts(current, hosts):
                current = None
            if current is None:
                leaf = issue(ca, role, SERVER if server else CLIENT, LEAF_DAYS, hosts if server else [])
                leaf.write(self.cert(role), self.key(role))
                made.append(role)
        for role in CLIENT_ROLES:
            _write_pem(self.pem(role), self.cert(role), self.key(role))
        return made

    @staticmethod
    def _load(role: str, cert: Path, key: Path) -> Issued | None:
        try:
            found = Issued.read(cert, key)
        except (OSError, ValueError):
            return None
        return None if found.expires_within(RENEW_BEFORE) or found.common_name != _subject(role) else found


def _subject(role: str) -> str:
    return "sutra-stack-ca" if role == "ca" else role


def _names_hosts(leaf: Issued, hosts: list[str]) -> bool:
    try:
        names = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(name in names for name in subject_names(hosts))


def _write_pem(path: Path, cert: Path, key: Path) -> None:
    write_private(path, cert.read_bytes() + key.read_bytes())
