"""Generated gRPC code must match what grpcio-tools makes from the protos now."""

import filecmp

from harness.procs import ROOT
from tools.gen_protos import generate


def test_generated_code_is_fresh(tmp_path):
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh, "protoc generated nothing"
    stale = [str(rel) for rel in fresh
             if not (ROOT / rel).exists() or not filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False)]
    assert not stale, f"generated code is stale, run `make gen`: {stale}"
