"""Which model fingerprint the frontend serves, and the rollout policy that moves it.

The replicas behind HAProxy can change model, precision, backend or window
while the frontend runs (`sutra rollout`, a Kubernetes RollingUpdate). The
frontend never pins what it saw at start-up: it learns, per pooled
connection, which fingerprint the replica at the other end serves (from
GetInfo on every connection on a schedule and on every mismatch, and from the
`model_fingerprint` of every Embed answer), and this module decides which one
is *active*: the one whose keys every request uses and every batch must be
answered with.

The rollout policy (README "Rolling upgrades" repeats it):

1. One response is always computed under one fingerprint. A request that
   started under the old one and meets the switch starts again from the top
   under the new one (keys, L1, L2, computation); it never mixes vectors.
2. The active fingerprint stays while *any* connection reaches a replica that
   still serves it: during a rollout the old model keeps serving until the
   last old replica is gone, and batches for it go only to connections known
   to reach it (or not yet known), so no inference is wasted on new replicas.
3. When no connection reaches the active fingerprint any more, and at least
   one reaches another, the frontend switches to the fingerprint reached by
   the most connections (ties: the one seen first). Until some connection
   reaches a replica at all (every replica restarting), nothing changes.
4. A fingerprint is adopted only with its replica's GetInfo (width, window,
   limits), so widths and truncation follow the new model at once.

Every frontend applies the same rule to what its connections see, so after a
rollout all frontends of a Service converge on the same fingerprint; while it
runs, a frontend may still serve the old one for as long as an old replica
is up (rule 2), by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import Unavailable


class FingerprintChanged(Unavailable):
    """A batch (and so a request) was started under a fingerprint that is no longer active;
    the engine starts the request again under `active`. Escaping to a caller, it is UNAVAILABLE."""

    def __init__(self, expected: str, active: str) -> None:
        super().__init__(f"the model changed during the request ({expected[:12]} -> {active[:12]}); retry")
        self.expected = expected
        self.active = active


@dataclass
class LiveFingerprints:
    """Per-connection knowledge of the replicas' fingerprints, and the active one (rules above).

    Pure state, touched only from the event loop; the pool feeds it and acts on `decide()`.
    `infos` maps a fingerprint to its replica's GetInfo (an `embedding.mlbase_pool.ReplicaInfo`)."""

    active: str | None = None
    by_connection: dict[int, str] = field(default_factory=dict)
    infos: dict[str, object] = field(default_factory=dict)
    first_seen: dict[str, int] = field(default_factory=dict)
    switches: int = 0
    _seq: int = 0

    def observe(self, connection: int, fingerprint: str, info: object | None = None) -> None:
        """`connection` reached a replica serving `fingerprint` (with its GetInfo when known)."""
        self.by_connection[connection] = fingerprint
        if info is not None:
            self.infos[fingerprint] = info
        if fingerprint not in self.first_seen:
            self._seq += 1
            self.first_seen[fingerprint] = self._seq

    def forget(self, connection: int) -> None:
        """`connection` failed or is reconnecting: it may land on any replica."""
        self.by_connection.pop(connection, None)

    def counts(self) -> dict[str, int]:
        """Connections per live fingerprint (what /metrics and GetInfo report)."""
        seen: dict[str, int] = {}
        for fingerprint in self.by_connection.values():
            seen[fingerprint] = seen.get(fingerprint, 0) + 1
        return seen

    def decide(self) -> str | None:
        """The fingerprint to switch to now, or None to keep the active one (rules 2-4)."""
        seen = self.counts()
        if self.active is not None and self.active in seen:
            return None
        candidates = [fp for fp in seen if fp in self.infos]
        if not candidates:
            return None
        best = max(candidates, key=lambda fp: (seen[fp], -self.first_seen[fp]))
        return None if best == self.active else best

    def adopt(self, fingerprint: str) -> None:
        if self.active is not None and fingerprint != self.active:
            self.switches += 1
        self.active = fingerprint

    def usable(self, connection: int, fingerprint: str | None) -> bool:
        """Whether a batch for `fingerprint` may go on `connection`: it reaches that fingerprint,
        or nobody knows yet where it leads."""
        known = self.by_connection.get(connection)
        return known is None or fingerprint is None or known == fingerprint

    def known_match(self, connection: int, fingerprint: str | None) -> bool:
        return fingerprint is not None and self.by_connection.get(connection) == fingerprint
