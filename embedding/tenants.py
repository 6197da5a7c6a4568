"""Who is calling: bearer tokens, tenants, and each tenant's width policy.

The access configuration comes from three optional sources, read once at
startup:

- `--auth-token TOKEN` (repeatable; or the SUTRA_AUTH_TOKEN variable, which,
  unlike a flag, other local users cannot read in the process list): tokens of
  the anonymous tenant "";
- `--auth-tokens-file PATH`: one `TOKEN [TENANT]` per line. A `#` starts a
  comment only at the start of a line or after whitespace, so a token may
  contain `#` (`abc#def acme` is token `abc#def` of tenant acme);
- `--tenants-file PATH` (YAML, or JSON by its .json suffix):

      tenants:
        acme:
          tokens: ["s3cret-acme"]          # a list; or token: "...", or token_sha256: [hex, ...]
          allowed_widths: [64, 128, 256]   # default: the frontend's policy
          default_width: 128               # default: the frontend's default if allowed, else the largest

Any token turns authentication on: every EmbeddingService call needs
`authorization: Bearer <token>`, and the caller's tenant is the one its token
belongs to (an `x-sutra-tenant` header is then ignored, so no caller can
claim another tenant's namespace). With no tokens at all the tenant comes
from the `x-sutra-tenant` header, which only a trusted gateway in front of
the frontend should set; a call without it is tenant "".

Cache isolation (`AccessConfig.isolate`, the tenant in every cache key):
with tokens it is on unless `--share-cache-across-tenants`, because tenants
that authenticate separately must not learn from cache hits (or their
timing) which texts another tenant has embedded. Without tokens nobody is
authenticated and the header is only a namespace, so it is on only with
`--isolate-tenants`.

Every token must be printable ASCII without spaces (what a bearer header
can carry); an empty token, or `tokens:` given as a string (which would
make each of its characters a token), stops the frontend at startup.

Tokens are kept only as SHA-256 digests and looked up by digest, so the
lookup time does not depend on how much of a guessed token is right, and a
tenants file can hold digests (`token_sha256`) instead of secrets.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InvalidInput, PermissionDenied, Unauthenticated
from common.matryoshka import WidthPolicy

TENANT_HEADER = "x-sutra-tenant"
AUTH_HEADER = "authorization"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TENANT_KEYS = {"token", "tokens", "token_sha256", "allowed_widths", "default_width"}
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no spaces: what `authorization: Bearer` carries
# A comment in a tokens file: `#` at the start of a line or after whitespace; any other `#` is
# part of a token.
_COMMENT = re.compile(r"(?:^|\s)#.*")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TenantSpec:
    """One tenant's width policy; () / 0 fall back to the frontend's own."""

    name: str
    allowed_widths: tuple[int, ...] = ()
    default_width: int = 0

    def policy(self, base: WidthPolicy) -> WidthPolicy:
        """This tenant's WidthPolicy on top of the model's `base` policy."""
        allowed = self.allowed_widths or base.allowed
        default = self.default_width
        if not default:
            default = base.default_width if (not allowed or base.default_width in allowed) else max(allowed)
        try:
            return WidthPolicy(native_width=base.native_width, min_width=base.min_width,
                               default_width=default, allowed=allowed)
        except ValueError as exc:
            raise ValueError(f"tenant {self.name!r}: {exc}") from exc


@dataclass(frozen=True)
class AccessConfig:
    """Tokens (as digests) → tenant, tenant specs, and whether caches are per tenant
    (decided by load_access from the flags; see the module doc)."""

    token_tenants: dict[str, str] = field(default_factory=dict)
    tenants: tuple[TenantSpec, ...] = ()
    isolate: bool = False
    # Digests of --admin-token: with authentication on, only these may call the cache-management RPCs.
    admin_digests: frozenset[str] = frozenset()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token_tenants)

    def describe(self) -> str:
        """One line for the startup log: who may call, and whether tenants share the cache."""
        if self.auth_enabled:
            who = (f"bearer tokens required ({len(self.token_tenants)} tokens, "
                   f"{len(set(self.token_tenants.values()))} tenants)")
            cache = ("cache isolated per tenant (--share-cache-across-tenants to share it)" if self.isolate else
                     "cache SHARED across tenants (--share-cache-across-tenants): a tenant can tell from cache "
                     "hits which texts another has embedded")
        else:
            who = "no authentication (no tokens configured)"
            cache = ("cache namespaced by the x-sutra-tenant header (--isolate-tenants); only a trusted gateway "
                     "should set it" if self.isolate else "one cache shared by all callers")
        return f"access: {who}; {cache}"


class Gate:
    """Resolves a call's tenant from its metadata; Unauthenticated when auth is on and the token is wrong."""

    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self._tenants = dict(config.token_tenants)

    @property
    def auth_enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        if not self._tenants:
            tenant = header(metadata, TENANT_HEADER) or ""
            if tenant and not _NAME.match(tenant):
                raise InvalidInput(f"`{TENANT_HEADER}` must be 1-64 characters from A-Z a-z 0-9 . _ -")
            return tenant
        value = header(metadata, AUTH_HEADER)
        if value is None:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        scheme, _, token = value.partition(" ")
        tenant = self._tenants.get(token_digest(token.strip())) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthenticated("invalid bearer token")
        return tenant

    def admin(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Allow a cache-management call: anyone without authentication; with it, only an admin token
        (Unauthenticated for a bad token, PermissionDenied for a valid one that is not an admin's)."""
        if not self._tenants:
            return
        self.tenant(metadata)
        _, _, token = (header(metadata, AUTH_HEADER) or "").partition(" ")
        if token_digest(token.strip()) not in self.config.admin_digests:
            raise PermissionDenied("cache management needs an admin token (--admin-token)")


def header(metadata, name: str) -> str | None:
    """The first value of `name` (lower case) in gRPC metadata or in HTTP headers of the same shape."""
    for key, value in metadata or ():
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


# -- loading ----------------------------------------------------------------------------------

def _add(tokens: dict[str, str], digest: str, tenant: str, where: str) -> None:
    previous = tokens.get(digest)
    if previous is not None and previous != tenant:
        raise ValueError(f"{where}: a token is given to two tenants ({previous!r} and {tenant!r})")
    tokens[digest] = tenant


def _add_token(tokens: dict[str, str], token, tenant: str, where: str) -> None:
    """Add a plain token after checking it; the error never shows the token (it may be a near-miss
    secret, and startup errors end up in logs)."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        kind = "an empty token" if token == "" else (
            "a token that is not a string (quote it)" if not isinstance(token, str) else
            "a token with spaces or characters other than printable ASCII")
        raise ValueError(f"{where}: {kind}; tokens are printable ASCII without spaces")
    _add(tokens, token_digest(token), tenant, where)


def _list(body: dict, key: str, at: str) -> list:
    """body[key] as a list ([] when absent). A string is refused: iterated, it would make each of
    its characters a token."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        got = "a string" if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{at}: `{key}` must be a list (got {got}); write `{key}: [\"...\"]`"
                         + (" or `token: \"...\"` for one token" if key == "tokens" else ""))
    return value


def _widths(value, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                              for w in value):
        raise ValueError(f"{where}: allowed_widths must be a list of positive integers")
    return tuple(sorted(set(value)))


def parse_tenants(doc, where: str, tokens: dict[str, str]) -> tuple[TenantSpec, ...]:
    """TenantSpecs from a parsed tenants file; their tokens go into `tokens`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), dict) or set(doc) - {"tenants"}:
        raise ValueError(f"{where}: expected a mapping with one key, `tenants: {{NAME: {{...}}}}`")
    specs = []
    for name, body in doc["tenants"].items():
        name = str(name)
        at = f"{where}: tenant {name!r}"
        if not _NAME.match(name):
            raise ValueError(f"{at}: names are 1-64 characters from A-Z a-z 0-9 . _ -")
        body = body or {}
        if not isinstance(body, dict) or set(body) - _TENANT_KEYS:
            raise ValueError(f"{at}: unknown keys {sorted(set(body) - _TENANT_KEYS) if isinstance(body, dict) else body}"
                             f"; allowed: {', '.join(sorted(_TENANT_KEYS))}")
        if "token" in body and not isinstance(body["token"], str):
            raise ValueError(f"{at}: `token` is one string (quote it); several go in `tokens: [...]`")
        plain = ([body["token"]] if "token" in body else []) + _list(body, "tokens", at)
        for token in plain:
            _add_token(tokens, token, name, at)
        for digest in _list(body, "token_sha256", at):
            if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
                raise ValueError(f"{at}: token_sha256 entries are 64 hex digits")
            _add(tokens, digest.lower(), name, where)
        allowed = _widths(body.get("allowed_widths"), at)
        default = body.get("default_width", 0)
        if not isinstance(default, int) or default < 0:
            raise ValueError(f"{at}: default_width must be a positive integer")
        if default and allowed and default not in allowed:
            raise ValueError(f"{at}: default_width {default} is not in allowed_widths {list(allowed)}")
        specs.append(TenantSpec(name, allowed, default))
    return tuple(specs)


def read_tenants_file(path: Path, tokens: dict[str, str]) -> tuple[TenantSpec, ...]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read tenants file {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a startup error with the file name
        raise ValueError(f"tenants file {path} does not parse: {exc}") from exc
    return parse_tenants(doc, str(path), tokens)


def read_tokens_file(path: Path, tokens: dict[str, str]) -> None:
    """`TOKEN [TENANT]` per line; blank lines and comments skipped. A comment starts with a `#` at
    the start of the line or after whitespace: cutting at any `#` would shorten a token that
    contains one and accept its prefix (for the anonymous tenant)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read tokens file {path}: {exc.strerror or exc}") from exc
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        parts = _COMMENT.sub("", line).split()
        if not parts:
            continue
        if len(parts) > 2:
            raise ValueError(f"{where}: expected `TOKEN [TENANT]`, found {len(parts)} fields (a comment starts "
                             f"with `#` at the start of a line or after a space)")
        if len(parts) == 2 and not _NAME.match(parts[1]):
            raise ValueError(f"{where}: expected `TOKEN [TENANT]`; tenant names are 1-64 characters from "
                             f"A-Z a-z 0-9 . _ -")
        _add_token(tokens, parts[0], parts[1] if len(parts) == 2 else "", where)


def load_access(*, tokens: Sequence[str] = (), tokens_file: str = "", tenants_file: str = "",
                isolate: bool = False, share: bool = False, admin_tokens: Sequence[str] = ()) -> AccessConfig:
    """The AccessConfig for the given flags; ValueError names the file and line that is wrong.

    `isolate` (--isolate-tenants) and `share` (--share-cache-across-tenants) decide cache
    isolation: with tokens it is on unless `share`, without tokens only with `isolate`. An empty
    --auth-token is refused rather than skipped: `--auth-token "$UNSET"` would otherwise start a
    frontend without authentication."""
    digests: dict[str, str] = {}
    for token in tokens:
        _add_token(digests, token.strip(), "", "--auth-token (or SUTRA_AUTH_TOKEN)")
    if tokens_file:
        read_tokens_file(Path(tokens_file).expanduser(), digests)
    specs: tuple[TenantSpec, ...] = ()
    if tenants_file:
        specs = read_tenants_file(Path(tenants_file).expanduser(), digests)
    admins = set()
    for token in admin_tokens:  # an admin token also embeds, as tenant ""
        _add_token(digests, token.strip(), "", "--admin-token (or SUTRA_ADMIN_TOKEN)")
        admins.add(token_digest(token.strip()))
    return AccessConfig(token_tenants=digests, tenants=specs, isolate=isolate or (bool(digests) and not share),
                        admin_digests=frozenset(admins))
