"""What overlapping the L2 round trip with the computation saves a lone caller: one stack, two
frontends side by side, one speculating (the default) and one asking L2 first.

    python -m bench.speculation [--requests N] [--backend auto|onnx|torch] [--out results/speculation.json]

The client alternates single new texts between the two, one request at a time, in a random
order per step (bench.lone_client).
"""

from __future__ import annotations

import sys

from bench.lone_client import Comparison, main
from harness.results import results_path

SPECULATION = Comparison(
    prog="python -m bench.speculation", doc=__doc__, variant="speculating", base="l2_first",
    ratio_label="speculating / L2 first", overrides={"speculate_below_l2_hit_rate": 0.0},
    default_out=results_path("speculation.json"))

if __name__ == "__main__":
    sys.exit(main(SPECULATION))
