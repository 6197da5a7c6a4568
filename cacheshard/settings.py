"""The shard's settings: one frozen dataclass, built once in main() from
flags and environment, validated at construction, and passed down to the
store and the server. Each field declares its flag, variable, default and
help once (common/settings.py). Nothing here reads the environment at import
time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cacheshard import budget
from common.cache_key import KEY_BYTES
from common.grpc_server import ServerOptions, server_settings
from common.settings import ServiceCli, Settings, at_least, not_negative, setting
from common.tracing import TracingOptions, tracing_group

DEFAULT_PORT = 50052
MODULE = "cacheshard"
DEFAULT_MAX_ENTRIES = 100_000
# One Store's key and value bytes together: the same as the transport's
# default --max-message-bytes (common.grpc_server), which refuses a larger
# message before it is parsed; this bound still holds where an operator
# raises that one (say, for Lookup answers of wide values). About 5300
# entries of the default model (790 bytes each), so --max-batch (4096) fit.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
# Appended to the database directory's name for the default --backup-dir.
BACKUP_SUFFIX = "-backups"
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
class ShardSettings(Settings):
    ENV_PREFIX = "SUTRA_CACHE_SHARD_"

    server: ServerOptions = server_settings(port=DEFAULT_PORT, port_env="SUTRA_CACHE_SHARD_PORT")
    tracing: TracingOptions = tracing_group(MODULE)
    # Made absolute at construction (against the working directory).
    path: Path = setting(Path(".run/cacheshard"), "database directory; created if missing, refused at startup if "
                                                  "it holds anything but a cache shard")
    sync: bool = setting(
        False, "fsync the write-ahead log before acknowledging a Store: an acknowledged entry survives power loss "
        "and kernel crashes, at the cost of one fsync per Store. Without it every Store still goes through the "
        "write-ahead log, so an acknowledged entry survives the shard process crashing or being killed (kill -9), "
        "but the last writes may be lost if the machine itself loses power")
    max_entries: int = setting(
        DEFAULT_MAX_ENTRIES, "size budget in entries: SST files plus memtables stay under max-entries * entry-bytes "
        "bytes, so the entry count stays under max-entries as long as entries take at least entry-bytes on disk; "
        f"while a flush waits for its FIFO compaction the total may briefly be up to {int(TRANSIENT_MARGIN * 100)}% "
        "over. Eviction is RocksDB FIFO compaction: the oldest SST file (roughly the oldest writes) is dropped "
        "first, a file at a time", check=at_least(1))
    entry_bytes: int = setting(
        DEFAULT_ENTRY_BYTES, "bytes one entry takes on disk, used to turn --max-entries into a byte limit; the "
        "default fits 384-wide float16 vectors. Entries smaller than this let more entries fit", check=at_least(1))
    # Keys have exactly KEY_BYTES bytes, so --max-batch also bounds a Lookup request's bytes.
    max_batch: int = setting(4096, f"most keys in one Lookup batch or entries in one Store; more is "
                             f"INVALID_ARGUMENT. Keys are {KEY_BYTES} bytes each, so this also bounds a "
                             "Lookup batch's size", check=at_least(1))
    max_request_bytes: int = setting(
        DEFAULT_MAX_REQUEST_BYTES, "most key plus value bytes in one Store; more is INVALID_ARGUMENT. The "
        "transport's --max-message-bytes bounds a message before it is parsed", check=at_least(1))
    max_width: int = setting(4096, "widest vector a stored value may hold (its codec header's width); a wider "
                                   "one is INVALID_ARGUMENT, and one read from disk is answered as a miss "
                                   "(counted as corrupt)", check=at_least(1))
    memory_entries: int = setting(
        DEFAULT_MAX_ENTRIES, "capacity of the in-memory tier in entries (about 0.9 KB each with the default model), "
        "0 = off. Stored values and values read from RocksDB are kept here, oldest dropped first; a lookup reads "
        "RocksDB only for keys this tier does not hold", check=not_negative)
    memory_bytes: int = setting(
        DEFAULT_MEMORY_BYTES, "capacity of the in-memory tier in value bytes, 0 = off; the oldest entries are "
        "dropped until both this and --memory-entries hold, so wide values cannot grow the process (Python's "
        "own overhead, about 140 bytes an entry with its key, is bounded by --memory-entries)", check=not_negative)
    block_cache_mb: int = setting(64, "RocksDB block cache in MiB", check=not_negative)
    memory_budget: int = setting(
        0, "bytes of RAM the shard may use (e.g. 2GiB, 512MiB), 0 = size the caches by --memory-entries, "
        "--memory-bytes and --block-cache-mb instead. When set it replaces those three: the process gets "
        f"{budget.BASE_BYTES // budget.MIB} MiB (idle RSS, free heap kept, messages in flight), two memtables "
        f"1/{budget.MEMTABLE_SHARE} of the rest each (at most 64 MiB), the block cache "
        f"1/{budget.BLOCK_CACHE_SHARE} of it or {budget.METADATA_BYTES_PER_ENTRY} bytes per --max-entries if more "
        "(every index and filter block stays cached), and the in-memory tier all that is left (a tier entry "
        "costs its value plus about 144 bytes). Resident memory stays within the budget; data beyond it is read "
        "from the page cache or the disk (cacheshard/budget.py)", parse=budget.parse_bytes, show=budget.show_bytes,
        metavar="BYTES", check=not_negative)
    row_cache_mb: int = setting(0, "RocksDB row cache in MiB, 0 = off; caches whole values so a repeated RocksDB "
                                   "read skips the block search. Mostly useful with --memory-entries 0",
                                check=not_negative)
    # Measured: 256-key multi-gets took ~710 us with statistics on against ~420 us without.
    rocksdb_statistics: bool = setting(
        False, "turn on RocksDB's statistics and export every ticker on /metrics "
        "(sutra_cacheshard_rocksdb_ticker_total: FIFO compactions, WAL syncs, block cache hits...); they make "
        "multi-gets about 70% slower, so they are for diagnosis. Without them /metrics still has RocksDB's "
        "properties (SST and memtable bytes, compactions, stalls, WAL syncs)")
    io_threads: int = setting(2, "threads that run RocksDB calls off the event loop", check=at_least(1))
    # Measured: a multi-get of one key RocksDB's filters rule out takes ~3 us; the hop to a worker
    # thread and back costs two thread wake-ups (tens of microseconds and two context switches each
    # way on a 2-vCPU VM) per cold lookup, the most frequent lookup of new traffic.
    inline_read_keys: int = setting(
        8, "a lookup with at most this many keys the memory tier lacks reads them from RocksDB on the event "
        "loop (microseconds for keys RocksDB's filters rule out, the usual cold miss) instead of hopping to an "
        "--io-threads worker and back; larger ones always go to the workers. 0: every read goes to the workers",
        check=not_negative)
    # None = derived from `path` (see `backups`), so a copy with another path derives its own.
    backup_dir: Path | None = setting(
        None, "directory that Checkpoint writes into: a checkpoint named NAME goes to DIR/NAME. Callers name "
        "checkpoints, never paths, so they cannot write elsewhere. Must be outside --path",
        parse=Path, metavar="DIR", shown=f"<--path>{BACKUP_SUFFIX}, beside the database directory")
    keep: int = setting(3, "checkpoints kept in --backup-dir: after each checkpoint the oldest beyond this many "
                           "are deleted (releasing the SST files they hard-link), 0 = keep all",
                        check=not_negative)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser().absolute())
        if self.backup_dir is not None:
            object.__setattr__(self, "backup_dir", Path(self.backup_dir).expanduser().absolute())
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = []
        if self.max_entries >= 1 and self.entry_bytes >= 1 and self.sst_limit_bytes < MIN_MEMTABLE_BYTES:
            problems.append(f"--max-entries x --entry-bytes must be at least "
                            f"{(MAX_MEMTABLES + 1) * MIN_MEMTABLE_BYTES // 1024} KiB")
        if self.memory_budget:
            try:
                self.memory_plan
            except ValueError as exc:
                problems.append(str(exc))
        backups = self.backups
        if backups == self.path or self.path in backups.parents or backups in self.path.parents:
            problems.append("--backup-dir must be outside --path (and not contain it)")
        return problems

    @property
    def backups(self) -> Path:
        """Where checkpoints go: --backup-dir, or by default `<path>-backups` beside the database
        directory (one per database, so two shards never prune each other's checkpoints)."""
        if self.backup_dir is not None:
            return self.backup_dir
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    @property
    def budget_bytes(self) -> int:
        """Bytes that SST files and memtables together stay under."""
        return self.max_entries * self.entry_bytes

    @property
    def memory_plan(self) -> budget.MemoryPlan | None:
        """How --memory-budget is split; None without one (ValueError if it cannot be split)."""
        if not self.memory_budget:
            return None
        return budget.plan(self.memory_budget, self.max_entries, self._disk_memtable_bytes, MAX_MEMTABLES)

    @property
    def _disk_memtable_bytes(self) -> int:
        return max(MIN_MEMTABLE_BYTES, min(MAX_MEMTABLE_BYTES, self.budget_bytes // MEMTABLE_FRACTION))

    @property
    def sizes(self) -> budget.MemoryPlan:
        """The sizes the shard runs with: --memory-budget's split, or without one (budget 0) each flag's own:
        --block-cache-mb, --memory-entries, --memory-bytes, and memtables of an eighth of the disk budget,
        at most 64 MiB."""
        return self.memory_plan or budget.MemoryPlan(
            budget=0, memtable_bytes=self._disk_memtable_bytes,
            block_cache_bytes=max(1, self.block_cache_mb) * budget.MIB,
            tier_entries=self.memory_entries, tier_value_bytes=self.memory_bytes)

    @property
    def memtable_bytes(self) -> int:
        """Each memtable: an eighth of the disk budget, at most 64 MiB, and within --memory-budget's share."""
        return self.sizes.memtable_bytes

    @property
    def block_cache_bytes(self) -> int:
        return self.sizes.block_cache_bytes

    @property
    def tier_entries(self) -> int:
        """The in-memory tier's entry bound: --memory-entries, or --memory-budget's share."""
        return self.sizes.tier_entries

    @property
    def tier_value_bytes(self) -> int:
        """The in-memory tier's value-byte bound: --memory-bytes, or --memory-budget's share."""
        return self.sizes.tier_value_bytes

    @property
    def sst_limit_bytes(self) -> int:
        """FIFO's max_table_files_size: the budget less the memtables' share."""
        return self.budget_bytes - MAX_MEMTABLES * self.memtable_bytes


CLI = ServiceCli(
    ShardSettings, MODULE,
    description="The L2 cache shard: sutra.cache.v1.CacheShardService over RocksDB (rocksdict) with "
                "the write-ahead log on and a bounded size.",
    epilog="Backup: `python -m cacheshard checkpoint --address HOST:PORT --name NAME` asks a running shard "
           "for a consistent RocksDB checkpoint in --backup-dir/NAME (on the shard's machine), and `python -m "
           "cacheshard checkpoints --address HOST:PORT` lists them; start a shard with --path on a checkpoint "
           "(or a copy of it) to restore it. Run `python -m cacheshard checkpoint --help` for the flags.")
# The service's public API: deploy, the harness and tests call these by name.
build_parser, load_settings, command = CLI.build_parser, CLI.load_settings, CLI.command
