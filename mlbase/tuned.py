"""The tuner's record, and how `--backend auto` reads it.

Which backend and precision serve fastest at equal quality depends on the
CPU: bf16 pays off where AMX or AVX512-BF16 do the matrix work and is
emulated (slow) elsewhere; int8 kernels differ with VNNI/AMX-INT8. So
`sutra tune` (mlbase.tune) measures on the CPU at hand and records its
choice under a key made of the CPU's model name and the instruction-set
flags that decide those kernels. One file may hold records for several CPUs
(e.g. a fleet's file checked into a deployment); a replica reads only the
record whose key equals its own CPU's and whose model digest equals its
model's, and otherwise falls back to the default backend with a log line
saying why. Two machines reporting the same model name ("Intel Xeon
Processor" in many VMs) but different flags get different records.

File layout (JSON):

    {"version": 1,
     "records": {"<cpu key>": {"cpu": {...}, "model_digest": "...",
                               "choice": {"backend": "onnx", "precision": "int8-static",
                                          "keep_fp32": [...], "label": "int8-static+cal:..."},
                               "rule": "...", "candidates": [...], "tuned_at": "...", ...}}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlbase.filelock import locked, write_json_atomic

log = logging.getLogger(__name__)

RECORD_VERSION = 1
CPUINFO = Path("/proc/cpuinfo")
# Flags that change which kernels onnxruntime and oneDNN run (and so which backend wins).
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuIdentity:
    model: str
    # RELEVANT_FLAGS present, in that order.
    flags: tuple[str, ...]
    cores: int

    @property
    def key(self) -> str:
        """What records are filed under: the model name and the flags (not the core count: the
        record also says at how many threads it measured)."""
        return f"{self.model} [{' '.join(self.flags)}]"


def cpu_identity(cpuinfo: str | None = None) -> CpuIdentity:
    """This machine's CPU, from /proc/cpuinfo (or the text given); elsewhere the platform's
    processor name and no flags."""
    if cpuinfo is None:
        cpuinfo = CPUINFO.read_text(errors="replace") if CPUINFO.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in fields:
            fields[name.strip()] = value.strip()
    model = fields.get("model name") or fields.get("Model name") or platform.processor() or platform.machine()
    present = set(fields.get("flags", "").split())
    return CpuIdentity(model, tuple(f for f in RELEVANT_FLAGS if f in present), os.cpu_count() or 1)


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    keep_fp32: tuple[str, ...]
    # The fingerprint's precision when it was measured (names the calibration set, kept layers).
    label: str = ""

    @classmethod
    def from_json(cls, data: dict) -> "Choice":
        return cls(data["backend"], data["precision"], tuple(data.get("keep_fp32", ())), data.get("label", ""))


def read(path: Path) -> dict:
    """The record file, or an empty one when there is none."""
    if not path.is_file():
        return {"version": RECORD_VERSION, "records": {}}
    data = json.loads(path.read_text())
    if data.get("version") != RECORD_VERSION:
        raise ValueError(f"{path}: record version {data.get('version')!r}, expected {RECORD_VERSION}")
    return data


def write(path: Path, cpu: CpuIdentity, record: dict) -> None:
    """File `record` under `cpu`'s key, keeping the other CPUs' records (merged under a lock)."""
    path = Path(path)
    with locked(path.with_name(path.name + ".lock")):
        data = read(path)
        data["records"][cpu.key] = {**record, "cpu": {**dataclasses.asdict(cpu), "key": cpu.key}}
        write_json_atomic(path, data)


def lookup(path: Path, cpu: CpuIdentity, model_digest: str) -> tuple[dict | None, str]:
    """The record with a winner for this CPU and model, or None and why not."""
    try:
        data = read(Path(path))
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    record = data["records"].get(cpu.key)
    if record is None:
        return None, f"{path} has no record for this CPU ({cpu.key})"
    if record.get("model_digest") != model_digest:
        return None, f"{path}'s record for this CPU was tuned for another model"
    if not record.get("choice"):
        return None, f"{path}'s record for this CPU has no winner (no candidate passed both gates)"
    return record, f"tuned {record.get('tuned_at', '?')} at {record.get('threads', '?')} threads"


def model_digest(model_path: str) -> str:
    from mlbase.backends.digest import files_digest, torch_model_files

    root = Path(model_path).expanduser().resolve()
    return files_digest(root, torch_model_files(root))


def resolve(settings, cpu: CpuIdentity | None = None):
    """`settings` with --backend auto replaced by the recorded choice for this CPU (tuning
    first if --tune-at-start and there is none), else by the default backend; any other
    backend is returned as it is."""
    from mlbase import settings as mlbase_settings

    if settings.backend_name != mlbase_settings.AUTO_BACKEND:
        return settings
    cpu = cpu or cpu_identity()
    path = Path(settings.tuned_file)
    record, why = ensure(settings, cpu) if settings.tune_at_start else lookup(path, cpu, model_digest(settings.model_path))
    if record is None:
        fallback = mlbase_settings.DEFAULT_BACKEND
        log.warning("--backend auto: %s; using the default, %s %s (run `sutra tune` on this machine to choose)",
                    why, fallback, mlbase_settings.DEFAULT_PRECISION[fallback])
        return dataclasses.replace(settings, backend_name=fallback, precision="", int8_keep_fp32=None)
    choice = Choice.from_json(record["choice"])
    log.info("--backend auto: %s %s%s from %s for this CPU (%s; %s)", choice.backend, choice.precision,
             f" (fp32 layers {','.join(choice.keep_fp32)})" if choice.keep_fp32 else "", path, cpu.key, why)
    threads = settings.threads or os.cpu_count() or 1
    if record.get("threads") != threads:
        log.warning("--backend auto: this replica runs %d threads but the record was measured at %s; the winner "
                    "can differ (run `sutra tune --threads %d`)", threads, record.get("threads"), threads)
    return dataclasses.replace(settings, backend_name=choice.backend, precision=choice.precision,
                               int8_keep_fp32=choice.keep_fp32)


def ensure(settings, cpu: CpuIdentity | None = None, announce=None) -> tuple[dict | None, str]:
    """The record for this CPU and model in `settings.tuned_file`, tuning (quick) first when there
    is none. Replicas starting together and `sutra up` tune once: the others wait on the lock,
    then read the record. `announce(line)` is told before a tune starts (it takes minutes)."""
    cpu = cpu or cpu_identity()
    path = Path(settings.tuned_file)
    digest = model_digest(settings.model_path)
    record, why = lookup(path, cpu, digest)
    if record is not None:
        return record, why
    with locked(path.with_name(path.name + ".tuning")):
        record, why = lookup(path, cpu, digest)
        if record is None:
            if announce:
                announce(f"no tuned backend for this CPU in {path} ({why}); running `sutra tune --quick` at "
                         f"{settings.threads or os.cpu_count() or 1} thread(s) first (once per machine and model, "
                         "about 2 minutes on 2 cores)")
            tune_now(settings)
            record, why = lookup(path, cpu, digest)
    return record, why


def tune_now(settings) -> None:
    """`python -m mlbase.tune --quick` for these settings, in a child process (so the
    replica does not keep the candidates' libraries, threads and memory)."""
    from mlbase.tune import TuneSettings

    argv = [sys.executable, "-m", "mlbase.tune", *TuneSettings(replica=settings, quick=True).to_argv()]
    log.info("--tune-at-start: no record for this CPU; tuning (quick) first")
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("tuning failed (exit %d): %s", result.returncode, result.stderr.strip()[-2000:])
    else:
        log.info("tuned in %.0fs:\n%s", time.monotonic() - started, result.stdout.strip())
