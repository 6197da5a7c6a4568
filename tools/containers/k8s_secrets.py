"""The files behind the Kubernetes Secrets: the stack's certificates and the API tokens.

    python -m tools.containers.k8s_secrets [DIR]      default deploy/k8s/secrets

deploy/k8s/kustomization.yaml turns these files into one Secret per role
(secretGenerator), so `kubectl apply -k deploy/k8s` needs them first; DIR is
git-ignored. Certificates come from the local stack's CA code (deploy/pki.py): made
once and reused, server certificates naming the in-cluster names their callers dial.
Each pod gets only what it needs (SECRET_FILES): its own certificate and key, the CA
certificate, and for the shard and the replicas the operator certificate their exec
health probes present (kubelet's gRPC probes cannot speak TLS). The CA key stays in
DIR/pki and in no Secret. The token file gets one random token if it does not exist.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from deploy.manifests import K8S_NAMESPACE
from deploy.pki import StackPki

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "deploy" / "k8s" / "secrets"
# In-cluster names the servers are dialled by (namespace `sutra`). The cache shards are the
# pods of one StatefulSet behind the headless Service `cacheshard`; the frontend finds them
# by DNS (embedding/shard_source.py) and dials each by its pod name,
# cacheshard-<i>.cacheshard.sutra.svc.cluster.local, while checking every shard's
# certificate against SHARD_SERVER_NAME (--shard-tls-server-name, so an address without
# reverse DNS verifies too). One certificate serves every shard pod: the wildcard names
# each pod however many there are, so scaling the StatefulSet needs no new certificate.
# The replicas' certificate is checked against `mlbase`.
SHARD_SERVICE = "cacheshard"
SHARD_SERVER_NAME = f"{SHARD_SERVICE}.{K8S_NAMESPACE}.svc.cluster.local"
K8S_HOSTS = (SHARD_SERVICE, SHARD_SERVER_NAME, f"*.{SHARD_SERVICE}", f"*.{SHARD_SERVER_NAME}",
             "mlbase", f"mlbase-headless.{K8S_NAMESPACE}.svc.cluster.local", "haproxy")
TOKENS_FILE = "tokens"
# Secret name -> the files of DIR/pki it carries (mounted at /tls in that role's pods).
SECRET_FILES = {
    "sutra-tls-cacheshard": ("ca.crt", "cacheshard.crt", "cacheshard.key", "operator.crt", "operator.key"),
    "sutra-tls-mlbase": ("ca.crt", "mlbase.crt", "mlbase.key", "operator.crt", "operator.key"),
    "sutra-tls-haproxy": ("ca.crt", "haproxy.pem"),
    "sutra-tls-embedding": ("ca.crt", "embedding.crt", "embedding.key"),
}
TOKENS_SECRET = "sutra-auth-tokens"


def make(directory: Path) -> list[str]:
    """Make (or reuse) DIR/pki and DIR/tokens; returns what was made now."""
    made = [f"pki/{name}" for name in StackPki(directory / "pki").ensure(list(K8S_HOSTS))]
    tokens = directory / TOKENS_FILE
    if not tokens.exists():
        tokens.write_text(f"{secrets.token_urlsafe(32)}\n")
        tokens.chmod(0o600)
        made.append(TOKENS_FILE)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.containers.k8s_secrets",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    made = make(args.directory)
    print(f"{args.directory}: " + (f"made {', '.join(made)}" if made else "everything reused"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
