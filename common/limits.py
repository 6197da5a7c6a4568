"""The request-size checks every service applies before doing any work.

One function so the frontend and the replicas refuse the same requests with
the same wording: the message names the field and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import InvalidInput


def check_texts(texts: Sequence[str], *, field: str, max_inputs: int, max_chars: int) -> None:
    """INVALID_ARGUMENT for an empty list, too many texts, or a text over `max_chars`."""
    if not texts:
        raise InvalidInput(f"`{field}` cannot be empty")
    if len(texts) > max_inputs:
        raise InvalidInput(f"`{field}` has {len(texts)} entries; the limit is {max_inputs} (max_inputs)")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise InvalidInput(f"`{field}[{i}]` has {len(text)} characters; the limit is {max_chars} (max_chars)")
