"""Pieces every sutra-embed service shares: one implementation of each idea.

The Matryoshka transform, the cache key, the cache value codec, the error
table and the gRPC server scaffolding live here so the frontend, the model
replica and the cache shard cannot drift apart. Nothing in this package
imports torch or RocksDB, so the frontend stays light.
"""
