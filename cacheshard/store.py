"""The RocksDB side of the shard, through rocksdict: opening (with clear
startup errors), multi-get, atomic batch writes, size figures, checkpoints.

Everything here is synchronous and blocking; `cacheshard.shard` runs it on
a small thread pool so the event loop never waits on the disk.

Size bound: FIFO compaction. Every SST file stays in level 0; after each
flush RocksDB deletes the oldest SST files until their total is under
`sst_limit_bytes`, so eviction goes oldest file first, which is roughly
insertion order (a key rewritten later lives on in the newer file). Freshly
flushed files are merged a few at a time (`_merge_small_files`) so that the
file count, which every point lookup pays for, does not grow with the data. The
limit leaves room for the memtables, so SSTs plus memtables stay within
max_entries * entry_bytes (see `cacheshard.settings`).

Directory format: a marker file (`SUTRA_CACHE_SHARD`, JSON with a format
number) is written before RocksDB first creates the database, and copied
into every checkpoint. A directory with a RocksDB database but no marker,
or with another format number, is refused: it may be someone else's data,
or a layout this build does not read (for example a level-compacted
database, whose files FIFO would never evict).

Backups: checkpoints go into one backup directory, each under its own name.
A checkpoint hard-links the live SST files, so every kept checkpoint pins
disk space that eviction would otherwise free; `backup` therefore deletes
the oldest beyond the configured number after each one. Only directories
that carry the marker count as checkpoints (anything else an operator keeps
there is left alone), and one that a running shard has open (its RocksDB
LOCK is held) is never deleted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import rocksdict

from cacheshard.settings import MAX_MEMTABLES, ShardSettings

log = logging.getLogger(__name__)

MARKER = "SUTRA_CACHE_SHARD"
FORMAT = 1
_ROCKSDICT_CONFIG = "rocksdict-config.json"
HASH_BUCKETS = 1 << 16
# Intra-L0 compaction (see `_merge_small_files`): SSTs merged at a time, and the largest merged
# file as a fraction of the SST limit.
MERGE_FILES = 8
MERGE_MAX_FRACTION = 8


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    created_ns: int  # when its marker was written (the end of the checkpoint), ns since the epoch
    bytes: int  # file sizes added up; SSTs still shared with the database (hard links) count in full


# Figures RocksDB gives only as text. DB stats print counts through NumberToHumanString (12K,
# 3M) above 9999, so those two are exact only while small; the stall counts are exact.
_WAL = re.compile(r"Cumulative WAL: (\S+) writes, (\S+) syncs")
_STALL = re.compile(r"Cumulative stall: (\d+):(\d+):([\d.]+) H:M:S")
_STALL_COUNTS = re.compile(r"\btotal-(delays|stops): (\d+)")
_TICKER = re.compile(r"^(rocksdb\.[\w.]+) COUNT : (\d+)$", re.MULTILINE)
_HUMAN = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _human(text: str) -> int:
    """RocksDB's NumberToHumanString back to a number (`12K` -> 12000)."""
    digits, unit = (text[:-1], text[-1]) if text[-1:] in _HUMAN else (text, "")
    return int(digits) * _HUMAN[unit]


@dataclass(frozen=True)
class RocksdbFigures:
    """What RocksDB says about itself, read at scrape time."""

    properties: dict[str, int]  # the integer properties asked for
    wal_writes: int  # write batches through the write-ahead log (approximate above 9999)
    wal_syncs: int  # fsyncs of the write-ahead log (approximate above 9999)
    stall_seconds: float  # time writes spent delayed or stopped
    stalls: dict[str, int]  # "delays" and "stops": times RocksDB slowed or stopped writes
    tickers: dict[str, int] = field(default_factory=dict)  # every statistics ticker, with --rocksdb-statistics


class StartupError(Exception):
    """The database cannot be opened; the message is one line meant for the operator."""


class StoreError(Exception):
    """RocksDB refused a read or write at run time."""


def _check_directory(path: Path) -> None:
    """Refuse directories that are not (and cannot become) a cache shard; write the marker for a new one."""
    if path.exists() and not path.is_dir():
        raise StartupError(f"{path} exists and is not a directory")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise StartupError(f"cannot create database directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"database directory {path} is not writable by this user")
    marker = path / MARKER
    if marker.exists():
        try:
            found = json.loads(marker.read_text())["format"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"{marker} is unreadable ({exc}); not a cache shard directory this build can use") from None
        if found != FORMAT:
            raise StartupError(f"{path} holds cache shard format {found}; this build reads format {FORMAT}")
        config = path / _ROCKSDICT_CONFIG
        if config.exists():
            try:
                raw = json.loads(config.read_text()).get("raw_mode")
            except (OSError, ValueError) as exc:
                raise StartupError(f"{config} is unreadable: {exc}") from None
            if raw is not True:
                raise StartupError(f"{path} was written by rocksdict in pickle mode, not as a raw cache shard")
        return
    contents = [p.name for p in path.iterdir()]
    if "CURRENT" in contents:
        raise StartupError(f"{path} holds a RocksDB database that is not a cache shard (no {MARKER} marker); "
                           "refusing to open it")
    if contents:
        raise StartupError(f"{path} is not empty and is not a cache shard directory; "
                           "point --path at an empty or new directory")
    try:
        _write_marker(path)
    except OSError as exc:
        raise StartupError(f"cannot write to database directory {path}: {exc.strerror or exc}") from None


def _write_marker(directory: Path) -> None:
    tmp = directory / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "kind": "sutra cache shard", "keys": "raw bytes",
                   "values": "common.codec"}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rocksdb_options(settings: ShardSettings) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_paranoid_checks(True)
    opts.set_compaction_style(rocksdict.DBCompactionStyle.fifo())
    fifo = rocksdict.FifoCompactOptions()
    fifo.max_table_files_size = settings.sst_limit_bytes
    opts.set_fifo_compaction_options(fifo)
    opts.set_write_buffer_size(settings.memtable_bytes)
    # Keys are uniform hashes and are only ever read by exact match, so a
    # hash-bucketed memtable (bucket by the first 8 bytes) replaces the
    # skip-list seek, which was the largest single cost of a multi-get
    # (measured: ~420 -> ~220 us per 256 keys with everything in memtables).
    # It does not support concurrent memtable writes; writes are one batch
    # at a time anyway.
    opts.set_prefix_extractor(rocksdict.SliceTransform.create_fixed_prefix(8))
    opts.set_memtable_factory(rocksdict.MemtableFactory.hash_skip_list(HASH_BUCKETS, 4, 4))
    opts.set_allow_concurrent_memtable_write(False)
    opts.set_max_write_buffer_number(MAX_MEMTABLES)
    # All files live in level 0 under FIFO; keep RocksDB from throttling
    # writes because of the file count (the size limit and intra-L0
    # compaction, `_merge_small_files`, bound it anyway).
    opts.set_level_zero_file_num_compaction_trigger(MERGE_FILES)
    opts.set_level_zero_slowdown_writes_trigger(64)
    opts.set_level_zero_stop_writes_trigger(128)
    # float16 vectors do not compress; skip the CPU.
    opts.set_compression_type(rocksdict.DBCompressionType.none())
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(rocksdict.Cache(settings.block_cache_bytes))
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_data_block_index_type(rocksdict.DataBlockIndexType.binary_and_hash())
    table.set_data_block_hash_ratio(0.75)
    opts.set_block_based_table_factory(table)
    if settings.row_cache_mb > 0:
        opts.set_row_cache(rocksdict.Cache(settings.row_cache_mb * 1024 * 1024))
    if settings.rocksdb_statistics:
        opts.enable_statistics()
    opts.set_max_background_jobs(2)
    opts.set_keep_log_file_num(5)
    return opts


def _merge_small_files(db: rocksdict.Rdict, settings: ShardSettings) -> None:
    """Turn on FIFO's intra-L0 compaction: MERGE_FILES freshly flushed SSTs become one.

    Why: under FIFO every SST stays in level 0, so a point lookup probes
    every file's filter (and RocksDB's per-file work), and a file is one
    memtable flush (at most 64 MiB, about 70k entries). At 10M entries that
    is ~140 files, and the per-file work is what made lookups slow down with
    size (measured in process, 0.15-0.3 us per file per key: 14 files 8.9
    us, 7 files 6.9 us per key at 1M entries; README, Cache at scale).
    Merging flushed files cuts the count about MERGE_FILES-fold for one
    rewrite of each entry (10M entries: 23 files). RocksDB never merges a
    file again once it is larger than a memtable on average, and no merge
    makes a file over 1/MERGE_MAX_FRACTION of the SST limit, so FIFO still
    evicts oldest first, at most that share at a time. Merges therefore only
    happen where MERGE_FILES flushes fit in that share (an SST limit of at
    least 64 memtables: ~4.5M entries with 64 MiB memtables, fewer with the
    smaller memtables of a --memory-budget); smaller shards have few files.

    rocksdict does not expose the FIFO option `allow_compaction`, but
    RocksDB takes it as a mutable option after open (it is re-applied at
    every open, so the options file never decides)."""
    limit = settings.sst_limit_bytes
    db.set_options({
        "compaction_options_fifo": f"{{allow_compaction=true;max_table_files_size={limit}}}",
        "max_compaction_bytes": str(max(settings.memtable_bytes, limit // MERGE_MAX_FRACTION)),
    })


def _explain_open_error(path: Path, exc: Exception) -> str:
    text = str(exc)
    lowered = text.lower()
    if "lock" in lowered:
        return (f"{path} is locked by another process (is another cache shard running on it?): {text}")
    if "corruption" in lowered or "not supported" in lowered or "invalid argument" in lowered:
        return f"cannot open {path}: incompatible or damaged database: {text}"
    if "permission" in lowered or "read-only" in lowered or "not a directory" in lowered:
        return f"cannot write to {path}: {text}"
    return f"cannot open {path}: {text}"


class ShardStore:
    """One open database. Methods block; call them from a worker thread."""

    def __init__(self, settings: ShardSettings) -> None:
        self.settings = settings
        self.path = settings.path
        _check_directory(self.path)
        opts = rocksdb_options(settings)
        try:
            # Passing the default column family's options explicitly matters:
            # without it rocksdict reopens an existing database with the
            # options stored in its OPTIONS file, dropping our caches.
            self._db = rocksdict.Rdict(str(self.path), opts, column_families={"default": opts})
        except Exception as exc:  # rocksdict raises plain Exception
            raise StartupError(_explain_open_error(self.path, exc)) from None
        _merge_small_files(self._db, settings)
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.sync = settings.sync
        self._db.set_write_options(self._write_opts)
        self.entries_at_open = self.entries()

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        try:
            return self._db.get(keys)
        except Exception as exc:
            raise StoreError(f"read failed: {exc}") from exc

    def write(self, keys: list[bytes], values: list[bytes]) -> None:
        """One WriteBatch through the WAL (fsynced first in --sync mode)."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        put = batch.put
        for key, value in zip(keys, values):
            put(key, value)
        try:
            self._db.write(batch, self._write_opts)
        except Exception as exc:
            raise StoreError(f"write failed: {exc}") from exc

    def delete(self, keys: list[bytes]) -> None:
        """One WriteBatch of deletions through the WAL (the frontend's cache invalidation)."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key)
        try:
            self._db.write(batch, self._write_opts)
        except Exception as exc:
            raise StoreError(f"delete failed: {exc}") from exc

    def scan(self, start_after: bytes, limit: int) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Up to `limit` entries with keys after `start_after` (b"": from the first), in key order,
        and whether none follow (the frontend's cache export)."""
        found: list[tuple[bytes, bytes]] = []
        # The prefix extractor makes plain iterators prefix-bound: a scan needs total order.
        read = rocksdict.ReadOptions()
        read.set_total_order_seek(True)
        it = self._db.iter(read)
        try:
            if start_after:
                it.seek(start_after)
                if it.valid() and it.key() == start_after:
                    it.next()
            else:
                it.seek_to_first()
            while it.valid() and len(found) < limit:
                found.append((it.key(), it.value()))
                it.next()
            return found, not it.valid()
        except Exception as exc:
            raise StoreError(f"scan failed: {exc}") from exc
        finally:
            del it

    def entries(self) -> int:
        return self._db.property_int_value("rocksdb.estimate-num-keys") or 0

    def sst_bytes(self) -> int:
        return self._db.property_int_value("rocksdb.total-sst-files-size") or 0

    def figures(self, properties: Iterable[str]) -> RocksdbFigures:
        """RocksDB's own figures for /metrics: the integer `properties`, DB and column-family stats,
        and the statistics tickers when they are on. Thread-safe (RocksDB's property calls are)."""
        db = self._db
        values = {name: db.property_int_value(name) or 0 for name in properties}
        db_stats = db.property_value("rocksdb.dbstats") or ""
        wal = _WAL.search(db_stats)
        stall = _STALL.search(db_stats)
        stall_seconds = int(stall[1]) * 3600 + int(stall[2]) * 60 + float(stall[3]) if stall else 0.0
        cf_stats = db.property_value("rocksdb.cfstats-no-file-histogram") or ""
        tickers = {}
        if self.settings.rocksdb_statistics:
            tickers = {name: int(n) for name, n in _TICKER.findall(db.property_value("rocksdb.options-statistics")
                                                                    or "")}
        return RocksdbFigures(values, _human(wal[1]) if wal else 0, _human(wal[2]) if wal else 0,
                              stall_seconds, {kind: int(n) for kind, n in _STALL_COUNTS.findall(cf_stats)}, tickers)

    def bytes_on_disk(self) -> int:
        """SST files plus write-ahead logs."""
        wal = 0
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.endswith(".log"):
                    try:
                        wal += entry.stat().st_size
                    except FileNotFoundError:
                        pass
        return self.sst_bytes() + wal

    def checkpoint(self, dest: Path) -> Path:
        """A consistent copy in `dest` (which must not exist), marker included.

        Built next to `dest` and renamed into place, so `dest` either does not
        exist or is a complete, openable shard directory."""
        dest = dest.absolute()
        if dest.exists():
            raise FileExistsError(f"{dest} already exists")
        if not dest.parent.is_dir():
            raise FileNotFoundError(f"parent directory {dest.parent} does not exist")
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        try:
            rocksdict.Checkpoint(self._db).create_checkpoint(str(tmp))
            _write_marker(tmp)
            os.rename(tmp, dest)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def backup(self, backups: Path, name: str, keep: int) -> tuple[Path, list[str]]:
        """Checkpoint into `backups`/`name` (`backups` made if missing), then delete the oldest
        checkpoints beyond `keep` (0 = none); returns the new directory and the names deleted."""
        backups.mkdir(parents=True, exist_ok=True)
        done = self.checkpoint(backups / name)
        return done, prune_checkpoints(backups, keep, newest=name)

    def close(self) -> bool:
        """Flush memtables to SST files and release the lock; False if the flush failed.

        A flush the disk refuses (full, failing) is logged, not raised: every
        acknowledged entry is already in the write-ahead log, which the next
        open replays, so stopping loses nothing. After such a failure RocksDB
        also reports its stored error from close(); that is logged too."""
        flushed = True
        try:
            self._db.flush(True)
        except Exception as exc:  # rocksdict raises plain Exception
            flushed = False
            log.error("could not flush memtables (%s); acknowledged entries stay in the write-ahead log "
                      "and are replayed on the next start", exc)
        try:
            self._db.close()
        except Exception as exc:
            if flushed:
                raise
            log.error("closing the database after the failed flush: %s", exc)
        return flushed


def _directory_bytes(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def list_checkpoints(backups: Path) -> list[CheckpointInfo]:
    """The checkpoints in `backups`, oldest first: directories holding the marker whose names do
    not start with a dot (those are checkpoints still being written)."""
    found = []
    try:
        entries = list(os.scandir(backups))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            created = os.stat(os.path.join(entry.path, MARKER)).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.append(CheckpointInfo(entry.name, created, _directory_bytes(Path(entry.path))))
    return sorted(found, key=lambda c: (c.created_ns, c.name))


def _in_use(directory: Path) -> bool:
    """True when another process holds the directory's RocksDB LOCK: someone started a shard on
    this checkpoint in place. (RocksDB locks with fcntl; a probe that gets the lock drops it on close.)"""
    try:
        fd = os.open(directory / "LOCK", os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: keep it
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def prune_checkpoints(backups: Path, keep: int, newest: str) -> list[str]:
    """Delete the oldest checkpoints in `backups` beyond `keep` (0 = keep all), counting `newest`
    (the one just written, never deleted); one in use stays too. Returns the names deleted. A
    directory that cannot be deleted is logged and stays; the next checkpoint tries again."""
    if keep <= 0:
        return []
    others = [c.name for c in list_checkpoints(backups) if c.name != newest]
    deleted = []
    for name in others[:max(0, len(others) - (keep - 1))]:
        directory = backups / name
        if _in_use(directory):
            log.warning("checkpoint %s is open in a running shard; not deleting it", directory)
            continue
        try:
            shutil.rmtree(directory)
        except OSError as exc:
            log.error("could not delete old checkpoint %s: %s", directory, exc)
            continue
        deleted.append(name)
    return deleted
