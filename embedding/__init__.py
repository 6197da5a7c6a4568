"""The embedding frontend (sutra.embedding.v1.EmbeddingService).

`engine` holds the call path (validate, de-duplicate, L1, L2, single-flight,
batch to ML-base); `server` and `admin` are thin transports over it;
`client` and `cli` are what callers use. Run it with `python -m embedding`.
"""
