"""Files several replicas share: an exclusive lock around building or merging them, and
writes that a reader never sees half done.

Replicas starting together share the exported-graph cache (backends.onnx_export)
and the tuner's record (mlbase.tuned); both take a lock while they build or
merge, and both write to a temporary file renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive flock on `lock_file` (created with its folder), held for the block; blocks
    other holders, including another open of the same file in this process."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
