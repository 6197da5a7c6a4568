"""`python -m mlbase`: run one model replica (see `--help`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from common import tracing
from common.grpc_server import configure_logging
from mlbase import tuned
from mlbase.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    from mlbase.server import serve  # after parsing, so --help does not import grpc/torch

    try:
        # --backend auto: the tuner's choice for this CPU (tuning first if asked), else the default.
        settings = tuned.resolve(settings)
        with tracing.installed(settings.tracing, starts_traces=False):  # continues its callers' traces only
            asyncio.run(serve(settings))
            # Drained and stopped: a repeated SIGTERM while the last spans are exported or during
            # interpreter teardown must not turn exit 0 into -15.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except Exception:
        logging.getLogger("mlbase").exception("replica failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
