"""Health that tells the truth: a frontend whose cache misses stop making
progress reports NOT_SERVING.

Cache hits keep working in a wedged frontend, so neither a balancer nor a
probe that only asks "do you answer?" notices when misses stop being
computed (issue 10: `pending` stuck at 2,393 for good, health SERVING). The
watchdog looks at two signals. The first cannot lie: texts are pending and
no batch has ended, successfully or not, for `stall_s`. Every batch is cut
off at its deadline plus a second (`--mlbase-timeout` plus a second for
callers without one) even when a replica hangs, so with `stall_s` above
that only a stuck frontend stays quiet so long. The second catches a wedge
that sparse traffic would hide (each caller leaves before the next arrives,
so work never looks pending for long): the in-flight owner's own invariants
(`InFlight.check`, e.g. work queued beside a free slot with nothing to
dispatch it) broken on two checks in a row. Either sets a fault on the
server: readiness and `liveness` turn NOT_SERVING (an orchestrator restarts
the process) until a batch ends again and the invariants hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from common.grpc_server import ServiceServer
from embedding.inflight import InFlight

log = logging.getLogger(__name__)


class StallWatchdog:
    def __init__(self, inflight: Callable[[], InFlight | None], server: ServiceServer, *, stall_s: float,
                 interval_s: float = 1.0) -> None:
        self._inflight = inflight
        self._server = server
        self._stall_s = stall_s
        self._interval_s = min(interval_s, stall_s / 2)
        self._task: asyncio.Task | None = None
        self._closing = False
        self._broken_before = False

    @property
    def stalled(self) -> bool:
        return self._server.fault is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stall-watchdog")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if self._closing or task.cancelled():
            return
        log.error("stall watchdog died (%r); starting it again", task.exception())
        self.start()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def check(self) -> None:
        inflight = self._inflight()
        if inflight is None:
            return
        quiet = inflight.stalled_for()
        problems = inflight.check()
        broken, self._broken_before = bool(problems) and self._broken_before, bool(problems)
        if (quiet >= self._stall_s or broken) and self._server.fault is None:
            reason = (f"{inflight.pending} text(s) pending, {inflight.running} batch(es) running, "
                      f"no batch ended for {quiet:.0f}s" + (f"; {'; '.join(problems[:3])}" if problems else ""))
            log.error("cache misses are not progressing (%s): health NOT_SERVING (readiness and liveness) "
                      "so an orchestrator restarts this frontend", reason)
            await self._server.set_fault(reason)
        elif quiet < self._stall_s and not broken and self._server.fault is not None:
            log.warning("cache misses are progressing again: health SERVING")
            await self._server.set_fault(None)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
