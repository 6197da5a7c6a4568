"""Certificates for the containerised stack: the local stack's CA (deploy/pki.py), laid
out for containers that run as a non-root user.

    python -m tools.containers.pki DIR [--hosts cacheshard,mlbase,haproxy] [--owner 10001]

Compose runs this once per `up` as the `pki` service (root, one-shot) into the `tls`
volume that every other service mounts read-only; for Kubernetes it makes the files the
per-role Secrets are created from (README, "Containers and Kubernetes"). Certificates are
made once and reused (deploy.pki.StackPki.ensure); server certificates name the given
hosts (the service names the callers dial) and localhost (the health checks). Then:

- every role's certificate and key belong to --owner (the uid the images run as), mode 600;
- the CA key stays root's, mode 600: the services run as --owner and never read it, so a
  compromised service cannot issue itself another role's certificate;
- DIR is root:<owner> 750, so the owner can read the files but not replace them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.pki import CLIENT_ROLES, SERVER_ROLES, StackPki

DEFAULT_HOSTS = ("cacheshard", "mlbase", "haproxy")
CA_KEY = "ca.key"


def lay_out(directory: Path, hosts: list[str], owner: int) -> list[str]:
    """Make or reuse the certificates under `directory`, then hand them to `owner`."""
    pki = StackPki(directory)
    made = pki.ensure(hosts)
    readable = [pki.ca] + [p for role in (*SERVER_ROLES, *CLIENT_ROLES) for p in (pki.cert(role), pki.key(role))]
    readable += [pki.pem(role) for role in CLIENT_ROLES]
    # Only root can give files away; anyone else keeps them (the modes still apply).
    chown = os.chown if os.geteuid() == 0 else (lambda *_: None)
    for path in readable:
        chown(path, owner, owner)
        path.chmod(0o644 if path.suffix == ".crt" else 0o600)
    chown(directory / CA_KEY, 0, 0)
    (directory / CA_KEY).chmod(0o600)
    chown(directory, 0, owner)
    directory.chmod(0o750)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.containers.pki", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hosts", default=",".join(DEFAULT_HOSTS),
                        help="comma-separated names the server certificates answer on (besides localhost)")
    parser.add_argument("--owner", type=int, default=10001, help="uid (and gid) the services run as")
    args = parser.parse_args(argv)
    made = lay_out(args.directory, [h for h in args.hosts.split(",") if h], args.owner)
    print(f"certificates in {args.directory}: " + (f"issued {', '.join(made)}" if made else "all reused"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
