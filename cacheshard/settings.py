"""The shard's settings: one frozen dataclass, built once in main() from
flags and environment, validated there, and passed down to the store and
the server. Nothing here reads the environment at import time."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from common.flags import parse_bool
from common.grpc_server import ServerOptions, add_server_flags, server_options_from

DEFAULT_PORT = 50052
DEFAULT_MAX_ENTRIES = 100_000
# One entry on disk with the default model: 16-byte key + RocksDB's 8-byte
# internal suffix + a 774-byte float16 value (6-byte header + 384 * 2), plus
# block and index overhead; measured at about 817 bytes per entry in SSTs.
DEFAULT_ENTRY_BYTES = 820
# FIFO compaction evicts only SST files, and entries in memtables come on top
# of them. So the byte budget is split: memtables get budget / 8 each (at
# most two exist: the active one and the one being flushed) and the SST
# limit is what is left. Once FIFO has dropped the oldest files after a
# flush, SSTs + memtables are within the budget. FIFO runs in the background
# right after each flush; until it has (milliseconds, but writes keep
# coming meanwhile) the flushed files can push the total over the budget by
# up to two memtables: TRANSIENT_MARGIN. An entry takes more memtable bytes
# than SST bytes, so the split is conservative.
MEMTABLE_FRACTION = 8
MAX_MEMTABLES = 2
MIN_MEMTABLE_BYTES = 64 * 1024
MAX_MEMTABLE_BYTES = 64 * 1024 * 1024
TRANSIENT_MARGIN = MAX_MEMTABLES / MEMTABLE_FRACTION


@dataclass(frozen=True)
class ShardSettings:
    server: ServerOptions
    path: Path
    sync: bool = False
    max_entries: int = DEFAULT_MAX_ENTRIES
    entry_bytes: int = DEFAULT_ENTRY_BYTES
    max_batch: int = 4096
    memory_entries: int = DEFAULT_MAX_ENTRIES
    block_cache_mb: int = 64
    row_cache_mb: int = 0
    io_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_entries", "entry_bytes", "max_batch", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("memory_entries", "block_cache_mb", "row_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} cannot be negative")
        if self.sst_limit_bytes < MIN_MEMTABLE_BYTES:
            raise ValueError(f"--max-entries x --entry-bytes must be at least "
                             f"{(MAX_MEMTABLES + 1) * MIN_MEMTABLE_BYTES // 1024} KiB")

    @property
    def budget_bytes(self) -> int:
        """Bytes that SST files and memtables together stay under."""
        return self.max_entries * self.entry_bytes

    @property
    def memtable_bytes(self) -> int:
        return max(MIN_MEMTABLE_BYTES, min(MAX_MEMTABLE_BYTES, self.budget_bytes // MEMTABLE_FRACTION))

    @property
    def sst_limit_bytes(self) -> int:
        """FIFO's max_table_files_size: the budget less the memtables' share."""
        return self.budget_bytes - MAX_MEMTABLES * self.memtable_bytes


def add_shard_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--path", default=env("SUTRA_CACHE_SHARD_PATH", ".run/cacheshard"),
        help="database directory; created if missing, refused at startup if it holds anything but a "
             "cache shard (env SUTRA_CACHE_SHARD_PATH; default %(default)s)")
    parser.add_argument(
        "--sync", action="store_true", default=parse_bool(os.environ.get("SUTRA_CACHE_SHARD_SYNC", "")),
        help="fsync the write-ahead log before acknowledging a Store: an acknowledged entry survives "
             "power loss and kernel crashes, at the cost of one fsync per Store. Without it (the default) "
             "every Store still goes through the write-ahead log, so an acknowledged entry survives the "
             "shard process crashing or being killed (kill -9), but the last writes may be lost if the "
             "machine itself loses power (env SUTRA_CACHE_SHARD_SYNC=1)")
    parser.add_argument(
        "--max-entries", type=int, default=int(env("SUTRA_CACHE_SHARD_MAX_ENTRIES", DEFAULT_MAX_ENTRIES)),
        help="size budget in entries: SST files plus memtables stay under max-entries * entry-bytes bytes, "
             "so the entry count stays under max-entries as long as entries take at least entry-bytes on "
             f"disk; while a flush waits for its FIFO compaction the total may briefly be up to "
             f"{int(TRANSIENT_MARGIN * 100)}%% over. Eviction is RocksDB FIFO compaction: the oldest SST file "
             "(roughly the oldest writes) is dropped first, a file at a time "
             "(env SUTRA_CACHE_SHARD_MAX_ENTRIES; default %(default)s)")
    parser.add_argument(
        "--entry-bytes", type=int, default=int(env("SUTRA_CACHE_SHARD_ENTRY_BYTES", DEFAULT_ENTRY_BYTES)),
        help="bytes one entry takes on disk, used to turn --max-entries into a byte limit; the default "
             "fits 384-wide float16 vectors. Entries smaller than this let more entries fit "
             "(env SUTRA_CACHE_SHARD_ENTRY_BYTES; default %(default)s)")
    parser.add_argument(
        "--max-batch", type=int, default=int(env("SUTRA_CACHE_SHARD_MAX_BATCH", 4096)),
        help="most keys in one Lookup batch or entries in one Store; more is INVALID_ARGUMENT "
             "(env SUTRA_CACHE_SHARD_MAX_BATCH; default %(default)s)")
    parser.add_argument(
        "--memory-entries", type=int,
        default=int(env("SUTRA_CACHE_SHARD_MEMORY_ENTRIES", DEFAULT_MAX_ENTRIES)),
        help="capacity of the in-memory tier in entries (about 0.9 KB each with the default model), 0 = off. "
             "Stored values and values read from RocksDB are kept here, oldest dropped first; a lookup "
             "reads RocksDB only for keys this tier does not hold "
             "(env SUTRA_CACHE_SHARD_MEMORY_ENTRIES; default %(default)s)")
    parser.add_argument(
        "--block-cache-mb", type=int, default=int(env("SUTRA_CACHE_SHARD_BLOCK_CACHE_MB", 64)),
        help="RocksDB block cache in MiB (env SUTRA_CACHE_SHARD_BLOCK_CACHE_MB; default %(default)s)")
    parser.add_argument(
        "--row-cache-mb", type=int, default=int(env("SUTRA_CACHE_SHARD_ROW_CACHE_MB", 0)),
        help="RocksDB row cache in MiB, 0 = off; caches whole values so a repeated RocksDB read skips the "
             "block search. Mostly useful with --memory-entries 0 "
             "(env SUTRA_CACHE_SHARD_ROW_CACHE_MB; default %(default)s)")
    parser.add_argument(
        "--io-threads", type=int, default=int(env("SUTRA_CACHE_SHARD_IO_THREADS", 2)),
        help="threads that run RocksDB calls off the event loop "
             "(env SUTRA_CACHE_SHARD_IO_THREADS; default %(default)s)")


def settings_from(args: argparse.Namespace) -> ShardSettings:
    return ShardSettings(
        server=server_options_from(args),
        path=Path(args.path).expanduser().absolute(),
        sync=args.sync,
        max_entries=args.max_entries,
        entry_bytes=args.entry_bytes,
        max_batch=args.max_batch,
        memory_entries=args.memory_entries,
        block_cache_mb=args.block_cache_mb,
        row_cache_mb=args.row_cache_mb,
        io_threads=args.io_threads,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cacheshard",
        description="The L2 cache shard: sutra.cache.v1.CacheShardService over RocksDB (rocksdict) with "
                    "the write-ahead log on and a bounded size.",
        epilog="Backup: `python -m cacheshard checkpoint --address HOST:PORT --to DIR` asks a running shard "
               "for a consistent RocksDB checkpoint in DIR (on the shard's machine); start a shard with "
               "--path DIR to restore it. Run `python -m cacheshard checkpoint --help` for its flags.",
    )
    add_server_flags(parser, default_port=DEFAULT_PORT, port_env="SUTRA_CACHE_SHARD_PORT")
    add_shard_flags(parser)
    return parser
