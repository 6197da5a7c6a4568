"""The cache key: 128-bit BLAKE2b of (model fingerprint, tenant, exact text).

Fields are length-prefixed so no two (fingerprint, tenant, text) triples can
collide by concatenation. A new fingerprint makes every key new, so a new
model never reads an old model's entries; a tenant namespace does the same
between tenants when isolation is on.
"""

from __future__ import annotations

import hashlib

KEY_BYTES = 16


def cache_key(fingerprint: str, text: str, tenant: str = "") -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (fingerprint.encode(), tenant.encode(), text.encode("utf-8", "surrogatepass")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()
