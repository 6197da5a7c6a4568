"""`python -m mlbase`: run one model replica (see `--help`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from common.grpc_server import configure_logging
from mlbase.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    from mlbase.server import serve  # after parsing, so --help does not import grpc/torch

    try:
        asyncio.run(serve(settings))
    except Exception:
        logging.getLogger("mlbase").exception("replica failed")
        return 1
    # Drained and stopped: a repeated SIGTERM during interpreter teardown must not turn exit 0 into -15.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
