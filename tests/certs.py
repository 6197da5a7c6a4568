"""Throwaway certificates for the TLS tests, issued by common/pki.py (what `sutra up` uses).

`make_pki(dir)` writes a CA, a server certificate for 127.0.0.1/localhost
(used by every server in a test), a client certificate signed by the same
CA, a client certificate from a second, untrusted CA, and `client.pem`
(client certificate + key in one file, the form HAProxy's `crt` wants).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.pki import CLIENT, SERVER, issue, issue_ca


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


def make_pki(directory: Path, client_name: str = "sutra-client") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    ca = issue_ca("sutra-test-ca", days=2)
    (d / "ca.crt").write_bytes(ca.cert_pem())
    issue(ca, "sutra-server", SERVER, days=1, hosts=["localhost", "127.0.0.1"]).write(d / "server.crt", d / "server.key")
    client = issue(ca, client_name, CLIENT, days=1)
    client.write(d / "client.crt", d / "client.key")
    (d / "client.pem").write_bytes(client.cert_pem() + client.key_pem())
    issue(issue_ca("someone-else-ca", days=2), "intruder", CLIENT, days=1).write(d / "rogue.crt", d / "rogue.key")
    return Pki(ca=d / "ca.crt", server_cert=d / "server.crt", server_key=d / "server.key",
               client_cert=d / "client.crt", client_key=d / "client.key", client_pem=d / "client.pem",
               rogue_cert=d / "rogue.crt", rogue_key=d / "rogue.key")
