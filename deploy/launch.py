"""`python -m deploy.launch OVERRIDES_FILE -- COMMAND...`: exec COMMAND with the flags stored in
OVERRIDES_FILE (a JSON list of strings; absent or empty = none) appended.

supervisord fixes each program's command line when it reads its configuration,
and applies a changed one only by stopping the program's whole group (all the
replicas at once). The stack's replicas therefore start through this shim:
`sutra rollout` writes new flags into a replica's overrides file and restarts
that one replica, which comes back with them; flags given last win, so an
override replaces the flag of the same name. The shim replaces itself with
the command (exec), so supervisord's PID, signals and logs are the replica's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read_overrides(path: Path) -> list[str]:
    """The flags stored in `path`; [] when there is no file."""
    if not path.exists():
        return []
    flags = json.loads(path.read_text() or "[]")
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return flags


def write_overrides(path: Path, flags: list[str]) -> None:
    """Store `flags` for the next start, atomically (a replica starting meanwhile reads old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(flags)) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m deploy.launch OVERRIDES_FILE -- COMMAND...", file=sys.stderr)
        return 2
    command = [*argv[2:], *read_overrides(Path(argv[0]))]
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
