"""Chaos soak: impatient clients against the whole stack while processes hang and die."""
