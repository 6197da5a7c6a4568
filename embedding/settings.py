"""The frontend's one settings object, built once in main() from flags + env.

Every environment variable mirrors a flag; a flag given on the command line
wins. Nothing here runs at import time: `build_parser()` reads the
environment when it is called, so tests and other tools can build settings
from an explicit argv and environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.flags import parse_bool, split_csv
from common import codec
from common.grpc_server import ServerOptions, add_server_flags, server_options_from
from common.matryoshka import parse_widths
from common.tls import TlsClientOptions, add_client_tls_flags, client_tls_from
from embedding.tenants import AccessConfig, load_access

DEFAULT_PORT = 50051
DEFAULT_MLBASE = "127.0.0.1:50060"
DEFAULT_SHARDS = "127.0.0.1:50052"
DEFAULT_ADMIN_PORT = 9100


@dataclass(frozen=True)
class FrontendSettings:
    """Everything the frontend needs; validated once in `validate()`."""

    server: ServerOptions
    mlbase_address: str = DEFAULT_MLBASE
    cache_shards: tuple[str, ...] = (DEFAULT_SHARDS,)
    cache_enabled: bool = True
    # 0 = the replica's default width (its GetInfo).
    default_width: int = 0
    # () = the replica's allowed set.
    allowed_widths: tuple[int, ...] = ()
    l1_entries: int = 10_000
    cache_dtype: str = "float16"
    mlbase_connections: int = 4
    # Texts per ML-base Embed call, and how long to wait to fill one.
    max_batch: int = 64
    batch_window_ms: float = 2.0
    # Batches in flight to ML-base at once (across all connections).
    mlbase_concurrency: int = 8
    # Tries per batch (first call included) on UNAVAILABLE / RESOURCE_EXHAUSTED.
    # 8 tries span ~3.5 s of backoff (50 ms doubling, 1 s cap): enough for a
    # balancer restart plus the channels' reconnect backoff (up to 2 s), yet
    # a caller still gets UNAVAILABLE long before a usual deadline when no
    # replica is up (tests/faults/test_lb_faults.py, test_replica_faults.py).
    mlbase_attempts: int = 8
    # Timeout for a batch whose callers set no deadline.
    mlbase_timeout_s: float = 60.0
    # Seconds to wait at startup for ML-base's GetInfo; 0 = forever.
    mlbase_wait_s: float = 0.0
    max_inputs: int = 2048
    max_chars: int = 100_000
    # Texts waiting for or under computation; beyond it RESOURCE_EXHAUSTED.
    max_pending: int = 16_384
    l2_timeout_ms: float = 250.0
    l2_reconnect_max_ms: float = 2000.0
    # Lookups waiting on one shard at once; beyond it a lookup is a miss at once (bounded memory
    # while a shard hangs).
    l2_max_waiting: int = 256
    # Keepalive pings on each shard channel: a shard that stops answering them (SIGSTOP, a
    # partition without RST) has its connection closed after l2_keepalive_ms + its timeout.
    l2_keepalive_ms: int = 10_000
    writeback_queue: int = 10_000
    writeback_batch: int = 256
    # Seconds SIGTERM waits for queued L2 write-backs.
    writeback_flush_s: float = 5.0
    # EmbedStream requests processed concurrently (answers stay in order).
    stream_window: int = 4
    # An EmbedStream with no request and nothing outstanding for this long is ended
    # (DEADLINE_EXCEEDED), so abandoned streams cannot pile up; 0 = never.
    stream_idle_s: float = 300.0
    # Misses pending with no batch finishing for this long: the frontend is wedged, and turns
    # NOT_SERVING (readiness and liveness) until a batch finishes again.
    stall_s: float = 30.0
    # HTTP admin port (/cache/stats, /metrics); 0 disables.
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # TLS to ML-base (through HAProxy, end to end) and to the shards; None = plaintext.
    mlbase_tls: TlsClientOptions | None = None
    shard_tls: TlsClientOptions | None = None
    # Bearer tokens, tenants and tenant isolation (embedding/tenants.py).
    access: AccessConfig = field(default_factory=AccessConfig)

    def validate(self) -> "FrontendSettings":
        problems = []
        if not self.mlbase_address:
            problems.append("--mlbase must be HOST:PORT")
        if self.cache_enabled and not self.cache_shards and self.l1_entries == 0:
            problems.append("cache enabled but no L1 entries and no --cache-shard")
        if self.cache_dtype not in codec.DTYPES:
            problems.append(f"--cache-dtype must be one of {', '.join(codec.DTYPES)}")
        for name in ("mlbase_connections", "max_batch", "mlbase_concurrency", "max_inputs", "max_chars",
                     "max_pending", "writeback_batch", "stream_window", "mlbase_attempts", "l2_max_waiting"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("l1_entries", "writeback_queue", "default_width", "admin_port", "batch_window_ms",
                     "mlbase_wait_s", "writeback_flush_s", "stream_idle_s", "l2_keepalive_ms"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if 0 < self.l2_keepalive_ms < 1000:
            problems.append("--l2-keepalive-ms must be 0 (off) or at least 1000")
        if self.mlbase_timeout_s <= 0 or self.l2_timeout_ms <= 0 or self.stall_s <= 0:
            problems.append("--mlbase-timeout, --l2-timeout-ms and --stall-seconds must be positive")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def l1_enabled(self) -> bool:
        return self.cache_enabled and self.l1_entries > 0

    @property
    def l2_enabled(self) -> bool:
        return self.cache_enabled and bool(self.cache_shards)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    d = FrontendSettings(server=ServerOptions())

    def e(name: str, default):
        return env.get(name, default)

    p = argparse.ArgumentParser(
        prog="python -m embedding",
        description="sutra.embedding.v1.EmbeddingService: the public frontend. Answers from an in-process "
                    "LRU (L1), then the cache shards (L2), then model replicas (ML-base, usually via HAProxy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_server_flags(p, default_port=DEFAULT_PORT, port_env="SUTRA_EMBEDDING_PORT", env=env)
    p.add_argument("--mlbase", default=e("SUTRA_MLBASE_ADDRESS", DEFAULT_MLBASE),
                   help="ML-base address HOST:PORT, normally HAProxy's; a single replica works too "
                        "(env SUTRA_MLBASE_ADDRESS)")
    p.add_argument("--cache-shard", default=e("SUTRA_CACHE_SHARDS", DEFAULT_SHARDS),
                   help="L2 cache shards HOST:PORT[,HOST:PORT...]; keys are spread by rendezvous hashing; "
                        "empty = no L2 (env SUTRA_CACHE_SHARDS)")
    p.add_argument("--cache-enabled", type=parse_bool, default=e("SUTRA_CACHE_ENABLED", "true"),
                   help="false turns both cache levels off (env SUTRA_CACHE_ENABLED)")
    p.add_argument("--default-width", type=int, default=int(e("MATRYOSHKA_DIM", d.default_width)),
                   help="width used when a request says dimensions=0; 0 = the replica's default "
                        "(env MATRYOSHKA_DIM)")
    p.add_argument("--allowed-widths", default=e("SUTRA_ALLOWED_WIDTHS", ""),
                   help="comma-separated widths to accept; empty = the replica's policy "
                        "(env SUTRA_ALLOWED_WIDTHS)")
    p.add_argument("--l1-entries", type=int, default=int(e("SUTRA_L1_ENTRIES", d.l1_entries)),
                   help="in-process LRU size in entries (full-width float32 vectors); 0 disables L1 "
                        "(env SUTRA_L1_ENTRIES)")
    p.add_argument("--cache-dtype", default=e("SUTRA_CACHE_DTYPE", d.cache_dtype), choices=sorted(codec.DTYPES),
                   help="precision of vectors written to L2 (env SUTRA_CACHE_DTYPE)")
    p.add_argument("--mlbase-connections", type=int,
                   default=int(e("SUTRA_MLBASE_CONNECTIONS", d.mlbase_connections)),
                   help="separate TCP connections to ML-base (HAProxy in tcp mode balances connections, "
                        "not RPCs); each batch goes on the least-busy one (env SUTRA_MLBASE_CONNECTIONS)")
    p.add_argument("--max-batch", type=int, default=int(e("SUTRA_MAX_BATCH", d.max_batch)),
                   help="most texts per ML-base call (env SUTRA_MAX_BATCH)")
    p.add_argument("--batch-window-ms", type=float, default=float(e("SUTRA_BATCH_WINDOW_MS", d.batch_window_ms)),
                   help="how long cache misses wait for others to fill a batch (env SUTRA_BATCH_WINDOW_MS)")
    p.add_argument("--mlbase-concurrency", type=int,
                   default=int(e("SUTRA_MLBASE_CONCURRENCY", d.mlbase_concurrency)),
                   help="ML-base batches in flight at once, over all connections (env SUTRA_MLBASE_CONCURRENCY)")
    p.add_argument("--mlbase-attempts", type=int, default=int(e("SUTRA_MLBASE_ATTEMPTS", d.mlbase_attempts)),
                   help="tries per batch when ML-base answers UNAVAILABLE or RESOURCE_EXHAUSTED, each on another "
                        "connection after a doubling backoff from 50 ms (capped at 1 s), within the caller's "
                        "deadline; the default spans about 3.5 s, enough to ride out a balancer restart "
                        "(env SUTRA_MLBASE_ATTEMPTS)")
    p.add_argument("--mlbase-timeout", type=float, default=float(e("SUTRA_MLBASE_TIMEOUT", d.mlbase_timeout_s)),
                   help="seconds a batch may take when its callers set no deadline (env SUTRA_MLBASE_TIMEOUT)")
    p.add_argument("--mlbase-wait", type=float, default=float(e("SUTRA_MLBASE_WAIT", d.mlbase_wait_s)),
                   help="seconds to wait at startup for ML-base's GetInfo before exiting; 0 = forever. "
                        "Health is NOT_SERVING until it answers (env SUTRA_MLBASE_WAIT)")
    p.add_argument("--max-inputs", type=int, default=int(e("SUTRA_MAX_INPUTS", d.max_inputs)),
                   help="most inputs per request (env SUTRA_MAX_INPUTS)")
    p.add_argument("--max-chars", type=int, default=int(e("SUTRA_MAX_CHARS", d.max_chars)),
                   help="longest input in characters; the replica's own limit applies if lower "
                        "(env SUTRA_MAX_CHARS)")
    p.add_argument("--max-pending", type=int, default=int(e("SUTRA_MAX_PENDING", d.max_pending)),
                   help="texts waiting for or under computation; a request that would exceed it gets "
                        "RESOURCE_EXHAUSTED (env SUTRA_MAX_PENDING)")
    p.add_argument("--l2-timeout-ms", type=float, default=float(e("SUTRA_L2_TIMEOUT_MS", d.l2_timeout_ms)),
                   help="an L2 lookup slower than this counts as an error and the keys as misses "
                        "(fail-open) (env SUTRA_L2_TIMEOUT_MS)")
    p.add_argument("--l2-reconnect-max-ms", type=float,
                   default=float(e("SUTRA_L2_RECONNECT_MAX_MS", d.l2_reconnect_max_ms)),
                   help="longest backoff between attempts to reopen a failed shard stream "
                        "(env SUTRA_L2_RECONNECT_MAX_MS)")
    p.add_argument("--l2-max-waiting", type=int, default=int(e("SUTRA_L2_MAX_WAITING", d.l2_max_waiting)),
                   help="lookups waiting on one shard at once; more are misses at once, so a hung shard "
                        "cannot grow the frontend's memory (env SUTRA_L2_MAX_WAITING)")
    p.add_argument("--l2-keepalive-ms", type=int, default=int(e("SUTRA_L2_KEEPALIVE_MS", d.l2_keepalive_ms)),
                   help="interval of keepalive pings on each shard connection; a shard that does not answer "
                        "one is disconnected, even when no RST arrives; 0 = no pings (env SUTRA_L2_KEEPALIVE_MS)")
    p.add_argument("--writeback-queue", type=int, default=int(e("SUTRA_WRITEBACK_QUEUE", d.writeback_queue)),
                   help="L2 write-backs waiting to be stored; when full new ones are dropped and counted "
                        "(env SUTRA_WRITEBACK_QUEUE)")
    p.add_argument("--writeback-batch", type=int, default=int(e("SUTRA_WRITEBACK_BATCH", d.writeback_batch)),
                   help="most entries per L2 Store call (env SUTRA_WRITEBACK_BATCH)")
    p.add_argument("--writeback-flush", type=float,
                   default=float(e("SUTRA_WRITEBACK_FLUSH", d.writeback_flush_s)),
                   help="on SIGTERM, seconds to spend storing queued write-backs (env SUTRA_WRITEBACK_FLUSH)")
    p.add_argument("--stream-window", type=int, default=int(e("SUTRA_STREAM_WINDOW", d.stream_window)),
                   help="EmbedStream requests processed at once; answers stay in order (env SUTRA_STREAM_WINDOW)")
    p.add_argument("--stream-idle-seconds", type=float,
                   default=float(e("SUTRA_STREAM_IDLE_SECONDS", d.stream_idle_s)),
                   help="an EmbedStream that sends nothing and waits for nothing this long is ended with "
                        "DEADLINE_EXCEEDED; 0 = never (env SUTRA_STREAM_IDLE_SECONDS)")
    p.add_argument("--stall-seconds", type=float, default=float(e("SUTRA_STALL_SECONDS", d.stall_s)),
                   help="if texts wait for the model and no batch finishes for this long, health turns "
                        "NOT_SERVING (readiness and the `liveness` service) so an orchestrator restarts the "
                        "frontend (env SUTRA_STALL_SECONDS)")
    p.add_argument("--admin-port", type=int, default=int(e("SUTRA_ADMIN_PORT", d.admin_port)),
                   help="HTTP port for GET /cache/stats (JSON) and GET /metrics (Prometheus); 0 disables "
                        "(env SUTRA_ADMIN_PORT)")
    p.add_argument("--admin-host", default=e("SUTRA_ADMIN_HOST", d.admin_host),
                   help="address the admin HTTP server binds (env SUTRA_ADMIN_HOST)")
    # Through HAProxy in tcp mode, TLS to ML-base runs end to end to the replica.
    add_client_tls_flags(p, env, prefix="mlbase-", env_prefix="SUTRA_MLBASE_", what="ML-base")
    add_client_tls_flags(p, env, prefix="shard-", env_prefix="SUTRA_SHARD_", what="the cache shard")
    # The environment's token is kept out of --help's defaults.
    p.set_defaults(auth_token_env=e("SUTRA_AUTH_TOKEN", ""))
    p.add_argument("--auth-token", action="append", default=[], metavar="TOKEN",
                   help="accept `authorization: Bearer TOKEN` (tenant \"\"); repeatable. Any token from any "
                        "source turns authentication on: calls without a valid token get UNAUTHENTICATED "
                        "(health and reflection stay open) (env SUTRA_AUTH_TOKEN, one token)")
    p.add_argument("--auth-tokens-file", default=e("SUTRA_AUTH_TOKENS_FILE", ""),
                   help="file of accepted tokens, one `TOKEN [TENANT]` per line, # comments "
                        "(env SUTRA_AUTH_TOKENS_FILE)")
    p.add_argument("--tenants-file", default=e("SUTRA_TENANTS_FILE", ""),
                   help="YAML (or .json) `tenants: {NAME: {tokens: [...], allowed_widths: [...], "
                        "default_width: N}}`: per-tenant tokens and width policy; see README, Security "
                        "(env SUTRA_TENANTS_FILE)")
    p.add_argument("--isolate-tenants", type=parse_bool, nargs="?", const=True,
                   default=e("SUTRA_ISOLATE_TENANTS", "false"),
                   help="put the tenant in every cache key (L1, L2 and single-flight), so no tenant is served "
                        "or can time another's cached vectors. The tenant is its token's when tokens are "
                        "configured, else the x-sutra-tenant header (env SUTRA_ISOLATE_TENANTS)")
    return p


def settings_from_args(args: argparse.Namespace) -> FrontendSettings:
    cache_enabled = parse_bool(args.cache_enabled)
    isolate = parse_bool(args.isolate_tenants)
    return FrontendSettings(
        server=server_options_from(args),
        mlbase_address=args.mlbase,
        cache_shards=split_csv(args.cache_shard),
        cache_enabled=cache_enabled,
        default_width=args.default_width,
        allowed_widths=parse_widths(args.allowed_widths),
        l1_entries=args.l1_entries,
        cache_dtype=args.cache_dtype,
        mlbase_connections=args.mlbase_connections,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        mlbase_concurrency=args.mlbase_concurrency,
        mlbase_attempts=args.mlbase_attempts,
        mlbase_timeout_s=args.mlbase_timeout,
        mlbase_wait_s=args.mlbase_wait,
        max_inputs=args.max_inputs,
        max_chars=args.max_chars,
        max_pending=args.max_pending,
        l2_timeout_ms=args.l2_timeout_ms,
        l2_reconnect_max_ms=args.l2_reconnect_max_ms,
        l2_max_waiting=args.l2_max_waiting,
        l2_keepalive_ms=args.l2_keepalive_ms,
        writeback_queue=args.writeback_queue,
        writeback_batch=args.writeback_batch,
        writeback_flush_s=args.writeback_flush,
        stream_window=args.stream_window,
        stream_idle_s=args.stream_idle_seconds,
        stall_s=args.stall_seconds,
        admin_port=args.admin_port,
        admin_host=args.admin_host,
        log_level=args.log_level,
        mlbase_tls=client_tls_from(args, "mlbase-"),
        shard_tls=client_tls_from(args, "shard-"),
        access=load_access(tokens=[*args.auth_token, getattr(args, "auth_token_env", "")], tokens_file=args.auth_tokens_file,
                           tenants_file=args.tenants_file, isolate=isolate),
    ).validate()


def load_settings(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> FrontendSettings:
    parser = build_parser(env)
    args = parser.parse_args(argv)
    try:
        return settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable; parser.error exits
