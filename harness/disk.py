"""A disk that really fills up, for one process only.

`PrivateDisk` gives a cache shard a small tmpfs of its own, mounted in a
private mount namespace that a holder process keeps alive: a real
filesystem that really returns ENOSPC, invisible to the rest of the
machine, gone when the holder exits. `NsProc` is a service started inside
that namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.procs import ROOT, Proc


class PrivateDisk:
    """A tmpfs of `size_mb` at `mountpoint`, visible only to processes started with `command()`.

    The holder (`sleep`) owns a private mount namespace; processes join it
    with nsenter; this side reads and writes the files through
    /proc/<holder>/root. Root uses a plain mount namespace; other users a
    user namespace in which they are root (unprivileged user namespaces).
    """

    def __init__(self, mountpoint: Path, size_mb: int) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.rootless = os.geteuid() != 0
        ns = ["--user", "--map-root-user"] if self.rootless else []
        script = f'mount -t tmpfs -o size={size_mb}m sutra-fault-disk "$0" && echo mounted && exec sleep 3600'
        self.holder = subprocess.Popen(["unshare", *ns, "--mount", "--propagation", "private", "sh", "-c",
                                        script, str(mountpoint)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        line = self.holder.stdout.readline().strip()
        if line != "mounted":
            self.holder.wait(10)
            raise RuntimeError(f"cannot mount a private tmpfs (unshare/mount refused): {self.holder.stderr.read()}")

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace (nsenter execs it: the PID stays the same)."""
        user = ["--user", "--preserve-credentials"] if self.rootless else []
        return ["nsenter", f"--target={self.holder.pid}", *user, "--mount", "--", *argv]

    def path(self, inside: Path | str) -> Path:
        """Where a path inside the namespace can be reached from here."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(inside).relative_to("/")

    def free_bytes(self) -> int:
        st = os.statvfs(self.path(self.mountpoint))
        return st.f_bavail * st.f_frsize

    def fill(self, name: str = "filler") -> int:
        """Write a file until the filesystem says ENOSPC; returns the bytes written."""
        written = 0
        with open(self.path(self.mountpoint / name), "wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 10, 64):
                try:
                    while True:
                        written += f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != 28:  # ENOSPC
                        raise
        return written

    def free(self, name: str = "filler") -> None:
        self.path(self.mountpoint / name).unlink()

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)


@dataclass
class NsProc(Proc):
    """A `python -m <module>` process started inside a PrivateDisk's namespace."""

    disk: PrivateDisk | None = None

    @classmethod
    def inside(cls, disk: PrivateDisk, proc: Proc, log_path: Path | None = None) -> "NsProc":
        """`proc` (a service launcher's module, flags, port and environment) started inside `disk`'s
        namespace instead, logging to `log_path` (default: `proc`'s)."""
        return cls(proc.module, list(proc.args), log_path or proc.log_path, proc.port, dict(proc.env),
                   credentials=proc.credentials, disk=disk)

    def start(self) -> "NsProc":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.disk.command([sys.executable, "-m", self.module, *self.args]),
                                      cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        return self
