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
from typing import Any

import grpc

from common.settings import Settings, add_flags, from_args, group, setting


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc


def _missing(**paths: str) -> list[str]:
    """A clear startup error for each certificate path that is not a readable file."""
    return [f"{what} {path}: no such file" for what, path in paths.items()
            if path and not Path(path).expanduser().is_file()]


@dataclass(frozen=True)
class TlsServerOptions(Settings):
    """A server's certificate chain and key (PEM); `client_ca` turns on mutual TLS."""

    cert: str = setting("", "PEM certificate chain this server presents; with --{prefix}key, the port speaks TLS "
                            "only", shown="plaintext")
    key: str = setting("", "PEM private key of --{prefix}cert")
    client_ca: str = setting("", "PEM CA bundle; when set, clients must present a certificate it signed "
                                 "(mutual TLS)", shown="no client certificates")
    allowed_clients: tuple[str, ...] = setting(
        (), "with --{prefix}client-ca, the client certificate common names that may call this service; others get "
            "PERMISSION_DENIED (health and reflection stay open to any certificate the CA signed)",
        metavar="NAME,...", shown="any certificate the CA signed")

    def problems(self) -> list[str]:
        if not (self.cert and self.key):
            return ["--tls-cert and --tls-key go together (and --tls-client-ca needs both)"]
        if self.allowed_clients and not self.client_ca:
            return ["--tls-allowed-clients needs --tls-client-ca (names are read from client certificates)"]
        return _missing(**{"--tls-cert": self.cert, "--tls-key": self.key, "--tls-client-ca": self.client_ca})

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
        if not self.mutual:
            return "TLS"
        who = ", ".join(self.allowed_clients) if self.allowed_clients else "any the CA signed"
        return f"mutual TLS (client certificates required: {who})"


@dataclass(frozen=True)
class TlsClientOptions(Settings):
    """How a client trusts a server and, for mutual TLS, proves who it is (PEM paths)."""

    ca: str = setting("", "PEM CA bundle that signed {what}'s certificate; empty = the system trust store")
    cert: str = setting("", "PEM client certificate presented to {what}, for mutual TLS")
    key: str = setting("", "PEM private key of --{prefix}cert")
    server_name: str = setting("", "name to check {what}'s certificate against instead of the dialled host")

    def problems(self) -> list[str]:
        if bool(self.cert) != bool(self.key):
            return ["a client certificate needs its key and a key needs its certificate"]
        return _missing(**{"TLS CA": self.ca, "TLS client certificate": self.cert, "TLS client key": self.key})

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS client key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS client certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


# Every server's and client's default, both directions: 2,048 inputs of a few hundred tokens, or
# 2,048 full-width vectors, fit with room to spare; a message over it is refused before it is
# parsed (RESOURCE_EXHAUSTED).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


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

def server_tls_group() -> Any:
    """The `tls` field of ServerOptions: --tls-cert/--tls-key/--tls-client-ca (env SUTRA_TLS_*)."""
    return group(TlsServerOptions, prefix="tls-", optional=True)


def client_tls_group(what: str | None, prefix: str = "") -> Any:
    """A settings field for one upstream `what`: a --{prefix}tls switch and --{prefix}tls-ca/-cert/-key/
    -server-name (None: `what` comes from add_flags' words)."""
    return group(TlsClientOptions, prefix=f"{prefix}tls-", words={"what": what} if what else {},
                 switch="connect to {what} over TLS; implied by any --{prefix}* flag")


@dataclass(frozen=True)
class ClientTlsFlags(Settings):
    """Lets a client command mount one upstream's TLS flags on its own parser (see add_client_tls_flags)."""

    tls: TlsClientOptions | None = client_tls_group(None)


# Client commands (embed, checkpoint) read their TLS settings from SUTRA_CLIENT_TLS, SUTRA_CLIENT_TLS_CA...
CLIENT_ENV_PREFIX = "SUTRA_CLIENT_"


def add_client_tls_flags(parser: argparse.ArgumentParser, env: Mapping[str, str], *, prefix: str, what: str,
                         env_prefix: str = CLIENT_ENV_PREFIX) -> None:
    """--{prefix}tls, --{prefix}tls-ca/-cert/-key/-server-name for one upstream (env {env_prefix}TLS...)."""
    add_flags(parser, ClientTlsFlags, env, prefix=prefix, env_prefix=env_prefix, words={"what": what})


def client_tls_from(args: argparse.Namespace, prefix: str) -> TlsClientOptions | None:
    """The options add_client_tls_flags' flags describe (`what` only shapes their help text)."""
    return from_args(ClientTlsFlags, args, prefix=prefix, words={"what": "the server"}).tls
