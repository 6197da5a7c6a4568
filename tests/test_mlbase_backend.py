"""The torch backend in-process (real model), the fingerprint, and settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mlbase.backends import registry
from mlbase.backends.base import BackendOptions
from mlbase.backends.digest import files_digest
from mlbase.settings import bundled_model_path, load_settings
from tests.support import AWKWARD_TEXTS, cosines

MODEL = bundled_model_path()
TEXTS = AWKWARD_TEXTS + [
    "word " * 300,  # over the 256-token window
    "the model window is 256 tokens " * 40,
]


@pytest.fixture(scope="module")
def backend():
    b = registry.create("torch", BackendOptions(model_path=MODEL, threads=1))
    b.load()
    return b


def test_tokens_are_exactly_what_sentence_transformers_feeds_the_model(backend):
    ref = backend.model.preprocess(TEXTS)
    encoded = backend.tokenize(TEXTS)
    padded = backend.tokenizer.pad(encoded)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(padded[name], ref[name].numpy()), name
    assert [e.truncated for e in encoded] == [False] * 5 + [True, True]
    assert [e.length for e in encoded][5:] == [256, 256]


def test_encode_equals_sentence_transformers_encode(backend):
    ours, truncated = backend.encode(TEXTS, batch_size=3)
    ref = backend.model.encode(TEXTS, show_progress_bar=False)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    assert cosines(ours, ref).min() > 0.9999
    assert truncated == [False] * 5 + [True, True]


def test_description_and_fingerprint(backend):
    d = backend.describe()
    assert (d.model_id, d.native_width, d.max_seq_length, d.backend, d.precision, d.normalize) == (
        "all-MiniLM-L6-v2", 384, 256, "torch", "fp32", True)
    assert '"pooling_mode": "mean"' in d.pooling
    fp = d.fingerprint()
    assert len(fp) == 64 and fp == dataclasses.replace(d, model_id="renamed").fingerprint()
    for change in ({"weights_digest": "0" * 64}, {"pooling": "[]"}, {"normalize": False},
                   {"max_seq_length": 128}, {"backend": "onnx"}, {"precision": "int8"}):
        assert dataclasses.replace(d, **change).fingerprint() != fp, change


def test_a_shorter_window_changes_the_loaded_fingerprint(backend):
    short = registry.create("torch", BackendOptions(model_path=MODEL, threads=1, max_seq_length=16))
    short.load()
    d = short.describe()
    assert d.max_seq_length == 16 and d.weights_digest == backend.describe().weights_digest
    assert [e.truncated for e in short.tokenize(["short", "a b c d e f g h i j k l m n o p"])] == [False, True]
    assert d.fingerprint() != backend.describe().fingerprint()


def test_files_digest_follows_content_not_timestamps(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"weights-v1")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    files = lambda: sorted(tmp_path.iterdir())  # noqa: E731
    first = files_digest(tmp_path, files())
    (tmp_path / "vocab.txt").touch()
    assert files_digest(tmp_path, files()) == first
    (tmp_path / "model.safetensors").write_bytes(b"weights-v2")
    assert files_digest(tmp_path, files()) != first


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="torch"):
        registry.create("nope", BackendOptions(model_path=MODEL))


def test_settings_from_flags_and_env():
    env = {"MATRYOSHKA_DIM": "128", "SUTRA_MLBASE_PORT": "50999", "SUTRA_ALLOWED_WIDTHS": "64,128,384",
           "SUTRA_MLBASE_MAX_QUEUE": "77", "SUTRA_LAYER_NORM": "true"}
    s = load_settings([], env)
    assert (s.server.port, s.default_width, s.allowed_widths, s.batch.max_queue, s.layer_norm) == (
        50999, 128, (64, 128, 384), 77, True)
    assert s.server.drain_seconds > 0 and s.server.max_connection_age_ms > 0
    assert s.backend.model_path == MODEL and s.backend_name == "onnx"
    assert (s.backend.precision, s.backend.keep_fp32) == ("fp32", ())
    torch_default = load_settings(["--backend", "torch"], {})
    assert (torch_default.backend.precision, torch_default.backend.keep_fp32) == ("fp32", ())
    int8 = load_settings(["--precision", "int8"], {})
    assert (int8.backend.precision, int8.backend.keep_fp32) == ("int8", ("layer.0.",))
    all_int8 = load_settings(["--precision", "int8", "--int8-keep-fp32", ""], {})
    assert (all_int8.backend.precision, all_int8.backend.keep_fp32) == ("int8", ())
    s = load_settings(["--port", "1", "--default-width", "64", "--no-layer-norm", "--max-batch-tokens", "99",
                       "--max-connection-age-ms", "0", "--threads", "3"], env)
    assert (s.server.port, s.default_width, s.layer_norm, s.batch.max_batch_tokens) == (1, 64, False, 99)
    assert s.server.channel_args() == [a for a in s.server.channel_args() if "connection_age" not in a[0]]
    assert s.backend.threads == 3
    defaults = load_settings([], {})
    assert (defaults.server.port, defaults.default_width, defaults.min_width, defaults.allowed_widths,
            defaults.layer_norm, defaults.max_inputs, defaults.max_chars) == (50061, 256, 32, (), False, 2048, 100_000)


@pytest.mark.parametrize("argv", [
    ["--default-width", "100", "--allowed-widths", "64,128"],
    ["--max-inputs", "0"],
    ["--backend", "tensorflow"],
    ["--model", "/nonexistent/model"],
    ["--max-batch-size", "0"],
])
def test_bad_settings_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        load_settings(argv, {})
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
