"""`sutra cache ...`: the frontend's cache-management RPCs from the command line.

    sutra cache invalidate TEXT...            drop these texts' entries (L1 and L2) under the active model
    sutra cache invalidate --all [--fingerprint FP]
                                              every entry of a fingerprint (a new cache generation)
    sutra cache export FILE                   every L2 entry into FILE (embedding/cache_file.py)
    sutra cache import FILE                   FILE's entries into this stack's shards
    sutra cache prewarm [--count N] [--fingerprint FP]
                                              embed the N most recently used texts with a rollout's new
                                              model and store them, before it takes traffic

invalidate and prewarm act on the default model, or on the one named by
--model (a name GetInfo lists in `models`); export and import carry every
model's entries (each key holds its model's fingerprint).

The frontend is the one `sutra up` recorded (or --address). With tokens
configured these need an admin token: --token, or SUTRA_ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from embedding import cache_file
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

IMPORT_MESSAGE_ENTRIES = 2048  # ~1.6 MB of float16 384-wide values per message, under the 4 MiB limit


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="frontend HOST:PORT (default: the one `up` recorded)")
    parser.add_argument("--token", default=os.environ.get("SUTRA_ADMIN_TOKEN", ""),
                        help="admin bearer token (default: $SUTRA_ADMIN_TOKEN)")
    sub = parser.add_subparsers(dest="cache_command", required=True)
    inv = sub.add_parser("invalidate", help="drop entries: of texts, or of a whole fingerprint (--all)")
    inv.add_argument("texts", nargs="*", help="texts whose entries to drop")
    inv.add_argument("--all", action="store_true", help="every entry of --fingerprint (default: the active one)")
    inv.add_argument("--fingerprint", default="", help="with --all: the fingerprint (default: the active one)")
    inv.add_argument("--model", default="", help="a served model's name (GetInfo models; default: the default model)")
    ex = sub.add_parser("export", help="write every L2 entry to FILE")
    ex.add_argument("file", type=Path)
    im = sub.add_parser("import", help="store FILE's entries into this stack's shards")
    im.add_argument("file", type=Path)
    pw = sub.add_parser("prewarm", help="embed recent texts with a rollout's new model before it takes traffic")
    pw.add_argument("--count", type=int, default=0, help="how many recent texts (default: all remembered)")
    pw.add_argument("--fingerprint", default="", help="fingerprint to warm (default: the one a rollout moves to)")
    pw.add_argument("--model", default="", help="the served model whose rollout to warm (default: the default model)")


def prewarm(stub: pb_grpc.EmbeddingServiceStub, count: int, fingerprint: str = "", metadata=(),
            timeout: float = 600, model: str = "") -> pb.PrewarmCacheResponse:
    return stub.PrewarmCache(pb.PrewarmCacheRequest(count=count, fingerprint=fingerprint, model=model),
                             metadata=metadata, timeout=timeout)


def _batches(path: Path) -> Iterator[pb.ImportCacheRequest]:
    with open(path, "rb") as source:
        batch = []
        for key, value in cache_file.read(source):
            batch.append(pb.CacheEntry(key=key, value=value))
            if len(batch) >= IMPORT_MESSAGE_ENTRIES:
                yield pb.ImportCacheRequest(entries=batch)
                batch = []
        if batch:
            yield pb.ImportCacheRequest(entries=batch)


def run(args: argparse.Namespace, address: str) -> int:
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with grpc.insecure_channel(args.address or address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        try:
            return _run(stub, args, metadata)
        except grpc.RpcError as exc:
            print(f"sutra cache {args.cache_command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except cache_file.BadCacheFile as exc:
            print(f"sutra cache import: {args.file}: {exc}", file=sys.stderr)
            return 1


def _run(stub, args, metadata) -> int:
    if args.cache_command == "invalidate":
        if bool(args.texts) == bool(args.all):
            print("sutra cache invalidate: give TEXT... or --all", file=sys.stderr)
            return 2
        reply = stub.InvalidateCache(pb.InvalidateCacheRequest(inputs=args.texts, all_entries=args.all,
                                                               fingerprint=args.fingerprint, model=args.model),
                                     metadata=metadata, timeout=60)
        if args.all:
            print(f"every entry of {reply.fingerprint} invalidated (cache generation {reply.generation})")
        else:
            print(f"{len(args.texts)} text(s) invalidated: {reply.l1_dropped} L1 entries dropped, "
                  f"{reply.l2_deleted} L2 keys deleted")
    elif args.cache_command == "export":
        tmp = args.file.with_name(args.file.name + ".partial")
        with open(tmp, "wb") as out:
            n = cache_file.write(out, ((e.key, e.value) for page in stub.ExportCache(
                pb.ExportCacheRequest(), metadata=metadata, timeout=3600) for e in page.entries))
        tmp.replace(args.file)
        print(f"{n} entries exported to {args.file}")
    elif args.cache_command == "import":
        reply = stub.ImportCache(_batches(args.file), metadata=metadata, timeout=3600)
        print(f"{reply.stored} entries imported from {args.file}")
    elif args.cache_command == "prewarm":
        reply = prewarm(stub, args.count, args.fingerprint, metadata, model=args.model)
        print(f"pre-warmed {reply.fingerprint}: {reply.texts} recent texts, {reply.already} already stored, "
              f"{reply.computed} embedded and stored in {reply.seconds:.1f}s")
    return 0
