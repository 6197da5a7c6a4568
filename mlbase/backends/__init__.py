"""Inference backends: one file per engine, chosen by name (see registry)."""
