"""The seeded plan: every operation, its start time and parameters, drawn from one seed."""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field

# Ends a client expects from an impatient call; anything else gets its details kept.
ROUTINE = {"OK", "DEADLINE_EXCEEDED", "CANCELLED", "SENT"}
# Statuses that mean the server failed in a way the contract rules out ("never a crash").
CRASH_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
OVERSIZE_CODES = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
FOUR_MIB = 4 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.enable_retries", 0)]
WORDS = ("cache shard replica vector model token batch stream deadline cancel river mountain quiet "
         "green signal orbit paper window garden lantern copper velvet harbor meadow thunder pixel "
         "saffron glacier compass violin ember tundra").split()


# -- the seeded plan -------------------------------------------------------------------------

@dataclass
class Op:
    kind: str
    at: float  # seconds after the start
    args: dict = field(default_factory=dict)


class Texts:
    def __init__(self, rng: random.Random, seed: int, salt: str) -> None:
        self.rng, self.prefix, self.n = rng, f"{salt}impatient {seed}", 0

    def fresh(self) -> str:
        self.n += 1
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 14)))
        return f"{self.prefix}-{self.n} {words}"


def plan(args: argparse.Namespace, max_chars: int) -> list[Op]:
    """Every operation with its start time and parameters, from the seed alone."""
    rng = random.Random(args.seed)
    texts = Texts(rng, args.seed, args.text_salt)
    u = rng.uniform
    lo, hi = args.deadline_ms

    def deadline() -> float:
        if args.deadline_dist == "log" and lo > 0:
            return math.exp(u(math.log(lo), math.log(hi)))
        return u(lo, hi)

    def stream_reqs() -> list[list[str]]:
        return [[texts.fresh() for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(*args.stream_requests))]

    ops: list[Op] = []
    for _ in range(args.singles):
        ops.append(Op("single", 0, {"text": texts.fresh(), "timeout": deadline()}))
    for _ in range(args.cancelled):
        ops.append(Op("cancelled", 0, {"text": texts.fresh(), "cancel_after": u(*args.cancel_after_ms)}))
    for _ in range(args.stream_cancels):
        ops.append(Op("stream_cancelled", 0, {"requests": stream_reqs(), "cancel_after": u(*args.cancel_after_ms),
                                              "read": rng.random() < 0.5}))
    for _ in range(args.abandoned):
        ops.append(Op("stream_abandoned", 0, {"requests": stream_reqs()}))
    for _ in range(args.groups):
        callers = []
        for _ in range(rng.randint(*args.group_size)):
            timeout = args.group_long_deadline_ms / 1000.0 if rng.random() < 0.33 else deadline()
            action = rng.choices(["wait", "cancel_early", "cancel_late"], [0.5, 0.25, 0.25])[0]
            cancel_after = (u(0.0, 0.002) if action == "cancel_early"
                            else u(0.5, 1.0) * timeout if action == "cancel_late" else None)
            callers.append({"stagger": u(0.0, 0.003), "timeout": timeout, "action": action,
                            "cancel_after": cancel_after})
        ops.append(Op("group", 0, {"text": texts.fresh(), "callers": callers}))
    for _ in range(args.oversized):
        variant = rng.choice(["over_chars", "over_4mib", "stream_over_chars"])
        size = FOUR_MIB + 256 * 1024 if variant == "over_4mib" else max_chars + 1
        ops.append(Op("oversized", 0, {"variant": variant, "size": size, "tag": texts.fresh()}))
    rng.shuffle(ops)
    if args.duration_s > 0:
        for op, at in zip(ops, sorted(u(0.0, args.duration_s) for _ in ops)):
            op.at = at
    return ops
