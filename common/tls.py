"""TLS for every hop: server credentials, client credentials, and channels.

One place turns certificate paths into gRPC credentials, so every service
and every client enables TLS the same way:

- a server with `TlsServerOptions` listens with TLS only; with `client_ca`
  set it also requires a client certificate signed by that CA (mutual TLS);
- a client with `TlsClientOptions` verifies the server against `ca` (the
  system trust store when empty), presents `cert`/`key` when given (for
  servers that require client certificates), and can check the server's
  certificate against `server_name` instead of the dialled host (useful
  when dialling an IP or a balancer whose certificate names the service).

Files are read when credentials are built (at startup), so a missing or
unreadable file is a startup error with the path in the message. `open_channel`
is the one way our code opens a channel: plaintext without options, TLS
with them, always with the message-size limits it is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class TlsServerOptions:
    """A server's certificate chain and key (PEM); `client_ca` turns on mutual TLS."""

    cert: str
    key: str
    client_ca: str = ""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        if self.client_ca:
            return grpc.ssl_server_credentials([pair], root_certificates=_read(self.client_ca, "client CA"),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials([pair])

    def describe(self) -> str:
        return "mutual TLS (client certificates required)" if self.mutual else "TLS"


@dataclass(frozen=True)
class TlsClientOptions:
    """How a client trusts a server and, for mutual TLS, proves who it is (PEM paths)."""

    ca: str = ""  # "" = the system trust store
    cert: str = ""
    key: str = ""
    server_name: str = ""  # "" = the host part of the address

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key and a key needs its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS client key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS client certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def message_options(max_message_bytes: int) -> list[tuple[str, object]]:
    """Channel arguments that cap both directions at `max_message_bytes`."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def open_channel(address: str, tls: TlsClientOptions | None, *, max_message_bytes: int,
                 options: Sequence[tuple[str, object]] = (), aio: bool = True):
    """A grpc.aio (or blocking, `aio=False`) channel: TLS when `tls` is given, else plaintext."""
    args = [*message_options(max_message_bytes), *options]
    module = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(address, options=args)
    return module.secure_channel(address, tls.credentials(), options=[*args, *tls.channel_options()])


# -- flags ------------------------------------------------------------------------------------

def add_server_tls_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """--tls-cert/--tls-key/--tls-client-ca on a server (env SUTRA_TLS_CERT/KEY/CLIENT_CA)."""
    parser.add_argument("--tls-cert", default=env.get("SUTRA_TLS_CERT", ""),
                        help="PEM certificate chain this server presents; with --tls-key, the port speaks TLS "
                             "only (env SUTRA_TLS_CERT; default: plaintext)")
    parser.add_argument("--tls-key", default=env.get("SUTRA_TLS_KEY", ""),
                        help="PEM private key of --tls-cert (env SUTRA_TLS_KEY)")
    parser.add_argument("--tls-client-ca", default=env.get("SUTRA_TLS_CLIENT_CA", ""),
                        help="PEM CA bundle; when set, clients must present a certificate it signed "
                             "(mutual TLS) (env SUTRA_TLS_CLIENT_CA; default: no client certificates)")


def _check_files(**flags: str) -> None:
    """A clear startup error for a certificate path that is not a readable file."""
    for flag, path in flags.items():
        if path and not Path(path).expanduser().is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")


def server_tls_from(args: argparse.Namespace) -> TlsServerOptions | None:
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (and --tls-client-ca needs both)")
    _check_files(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)
    return TlsServerOptions(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def add_client_tls_flags(parser: argparse.ArgumentParser, env: Mapping[str, str], *, prefix: str,
                         env_prefix: str, what: str) -> None:
    """--{prefix}tls, --{prefix}tls-ca/-cert/-key/-server-name for one upstream (env {env_prefix}TLS...)."""
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}tls", dest=f"{dest}tls", action=argparse.BooleanOptionalAction,
                        default=env.get(f"{env_prefix}TLS", "").strip().lower() in ("1", "true", "yes", "on"),
                        help=f"connect to {what} over TLS; implied by any --{prefix}tls-* flag below "
                             f"(env {env_prefix}TLS; default: plaintext)")
    for name, help_text in (
        ("ca", f"PEM CA bundle that signed {what}'s certificate; empty = the system trust store"),
        ("cert", f"PEM client certificate presented to {what}, for mutual TLS"),
        ("key", f"PEM private key of --{prefix}tls-cert"),
        ("server-name", f"name to check {what}'s certificate against instead of the dialled host"),
    ):
        var = f"{env_prefix}TLS_{name.upper().replace('-', '_')}"
        parser.add_argument(f"--{prefix}tls-{name}", dest=f"{dest}tls_{name.replace('-', '_')}",
                            default=env.get(var, ""), help=f"{help_text} (env {var}; default empty)")


def client_tls_from(args: argparse.Namespace, prefix: str) -> TlsClientOptions | None:
    dest = prefix.replace("-", "_")
    ca, cert, key, name = (getattr(args, f"{dest}tls_{n}") for n in ("ca", "cert", "key", "server_name"))
    if not (getattr(args, f"{dest}tls") or ca or cert or key or name):
        return None
    _check_files(**{f"{dest}tls_ca": ca, f"{dest}tls_cert": cert, f"{dest}tls_key": key})
    return TlsClientOptions(ca=ca, cert=cert, key=key, server_name=name)
