"""Test-only helpers. Processes, ports, health and load live in `harness`,
which the benchmarks share; what is here serves pytest alone."""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Iterator
from typing import Self

import numpy as np

from harness.procs import Proc

# Inputs every backend must embed exactly as sentence-transformers does: empty, tiny,
# ordinary, non-ASCII and emoji, and white space at both ends.
AWKWARD_TEXTS = [
    "",
    "hello",
    "How do I refuse to chose between different things to do in my life?",
    "Ünïcödé, emoji 🙂 and 中文 mixed in one line.",
    "   leading and trailing spaces   ",
]


def aio(test):
    """Run an async test function on a fresh event loop (no async pytest plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def serving(proc: Proc) -> Iterator[Proc]:
    """For a fixture (`yield from serving(proc)`): start `proc`, hand it over once SERVING,
    and afterwards require that it exits cleanly on SIGTERM (its log's tail otherwise)."""
    proc.start()
    try:
        proc.wait_serving()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def started(thing):
    """For a fixture (`yield from started(stack)`): start `thing` and hand it over; stop it
    afterwards, also when starting failed half way."""
    try:
        yield thing.start()
    finally:
        thing.stop()


class Background:
    """`_run` on a daemon thread for as long as the `with` block lasts; it loops until `_stop` is set."""

    def __init__(self, join_s: float = 5.0) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._join_s = join_s

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self._join_s)


# What asyncio and grpc log when a future or task is left behind, or a handler fails unexpectedly.
LEFT_BEHIND_SIGNS = ("never retrieved", "Traceback", "was destroyed but it is pending")


def left_behind(log_text: str) -> dict[str, int]:
    """How often each sign of a leaked future or task (or an unexpected traceback) is in a log.

    One traceback is grpc's, not ours, and is not counted: a unary answer that races the
    caller's deadline inside grpc's core ("ExecuteBatchError raised in core" from grpc's own
    send, with none of our frames after the handler returned). The same error from our own
    `context.abort` is counted: common.errors ends such an RPC quietly."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log_text)
    counted = [r for r in records
               if not ("ExecuteBatchError raised in core" in r and "_finish_handler_with_unary_response" in r
                       and "in _abort" not in r)]
    text = "\n".join(counted)
    return {sign: text.count(sign) for sign in LEFT_BEHIND_SIGNS if sign in text}
