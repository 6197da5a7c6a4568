"""Small parsers shared by every service's flags and environment variables,
so "true"/"1"/"on" mean the same thing to each of them."""

from __future__ import annotations

import argparse

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(text: str | bool) -> bool:
    """'true'/'1'/'yes'/'on' -> True, 'false'/'0'/'no'/'off'/'' -> False, else an argparse error."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def split_csv(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
