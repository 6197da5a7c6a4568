"""Test-only helpers. Processes, ports, health and load live in `harness`,
which the benchmarks share; what is here serves pytest alone."""

from __future__ import annotations

import asyncio
import functools


def aio(test):
    """Run an async test function on a fresh event loop (no async pytest plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run
