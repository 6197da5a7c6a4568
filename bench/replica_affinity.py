"""What replica affinity saves a lone caller: one stack, two frontends side by side, one sending
an idle pool's batch to the replica that answered last (the default) and one taking its
connections in turn (`--no-replica-affinity`, which alternates the replicas).

    python -m bench.replica_affinity [--requests N] [--block K] [--out results/replica_affinity.json]

The client sends blocks of 20 single new texts to one frontend, then to the other, in a random
order per round (bench.lone_client): affinity acts across requests, so one-by-one alternation
would hand each frontend a replica the other had just used.
"""

from __future__ import annotations

import sys

from bench.lone_client import Comparison, main
from harness.results import results_path

AFFINITY = Comparison(
    prog="python -m bench.replica_affinity", doc=__doc__, variant="affinity", base="in_turn",
    ratio_label="affinity / in turn", overrides={"replica_affinity": False}, block=20,
    default_out=results_path("replica_affinity.json"))

if __name__ == "__main__":
    sys.exit(main(AFFINITY))
