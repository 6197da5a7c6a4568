"""Entry point.

    python -m cacheshard [--port 50052] [--path DIR] [--sync] ...   serve
    python -m cacheshard checkpoint --address HOST:PORT --name NAME  back up a running shard
    python -m cacheshard checkpoints --address HOST:PORT             list its checkpoints

The database is opened before the port is bound, so a directory that is
locked, unwritable or in a foreign format ends the process at once with a
one-line reason on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from cacheshard.settings import DEFAULT_PORT, load_settings

log = logging.getLogger("cacheshard")

EXIT_STARTUP = 2


def serve(argv: list[str]) -> int:
    from cacheshard.budget import MALLOC_KEEP_BYTES
    from common.malloc_tuning import tune_malloc

    # Before gRPC allocates anything; see the module for the numbers. The free heap kept back is
    # part of --memory-budget's fixed share, so it is smaller than the module's default.
    tune_malloc(trim_threshold=MALLOC_KEEP_BYTES)
    settings = load_settings(argv)
    from common.grpc_server import configure_logging

    configure_logging(settings.server.log_level)
    from common import tracing

    with tracing.installed(settings.tracing, starts_traces=False):  # continues its callers' traces only
        return asyncio.run(_serve(settings))


async def _serve(settings) -> int:
    from cacheshard.metrics import make_registry
    from cacheshard.server import SERVICE_NAME, add_to_server
    from cacheshard.shard import Shard
    from cacheshard.store import ShardStore, StartupError
    from common.grpc_server import ServiceServer, run_until_signalled

    try:
        store = await asyncio.to_thread(ShardStore, settings)
    except StartupError as exc:
        print(f"cacheshard: {exc}", file=sys.stderr, flush=True)
        return EXIT_STARTUP
    shard = Shard(store, settings)
    log.info("opened %s: ~%d entries; budget %d entries = %d bytes (SST limit %d + 2 memtables of %d); "
             "memory tier %d entries / %d bytes; block cache %d bytes%s; %s mode; checkpoints in %s", settings.path,
             store.entries_at_open, settings.max_entries, settings.budget_bytes, settings.sst_limit_bytes,
             settings.memtable_bytes, settings.tier_entries, settings.tier_value_bytes, settings.block_cache_bytes,
             f" (--memory-budget {settings.memory_budget} bytes)" if settings.memory_budget else "",
             "sync (fsync before ack)" if settings.sync else "WAL",
             settings.backups)
    try:
        server = ServiceServer(settings.server, [SERVICE_NAME], metrics=make_registry(shard))
    except Exception as exc:
        await shard.close()
        print(f"cacheshard: cannot listen on {settings.server.host}:{settings.server.port}: {exc}",
              file=sys.stderr, flush=True)
        return EXIT_STARTUP
    servicer = add_to_server(shard, server.server)
    await run_until_signalled(server, cleanup=shard.close, pre_stop=servicer.close_idle_streams)
    return 0


def _call(prog: str, description: str, argv: list[str], rpc: str, request, add=lambda parser: None):
    """A client subcommand: parse its flags (address, timeout, TLS, and what `add` adds), send one
    `rpc` with `request(messages module, args)`; the reply, or None after printing the status."""
    parser = argparse.ArgumentParser(prog=f"python -m cacheshard {prog}", description=description)
    parser.add_argument("--address", default=os.environ.get("SUTRA_CACHE_SHARD_ADDRESS", f"127.0.0.1:{DEFAULT_PORT}"),
                        help="the shard's HOST:PORT (env SUTRA_CACHE_SHARD_ADDRESS; default %(default)s)")
    add(parser)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the answer (default %(default)s)")
    from common.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
    from common.tls import add_client_tls_flags, client_tls_from, open_channel

    add_client_tls_flags(parser, os.environ, prefix="", what="the shard")
    args = parser.parse_args(argv)

    import grpc

    from sutra.cache.v1 import cache_shard_service_pb2 as pb
    from sutra.cache.v1 import cache_shard_service_pb2_grpc as pb_grpc

    with open_channel(args.address, client_tls_from(args, ""), max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                      aio=False) as channel:
        try:
            return getattr(pb_grpc.CacheShardServiceStub(channel), rpc)(request(pb, args), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"cacheshard {prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None


def checkpoint(argv: list[str]) -> int:
    reply = _call(
        "checkpoint",
        "Ask a running shard to write a consistent RocksDB checkpoint of its database into its backup "
        "directory (the shard's --backup-dir, on the shard's machine) under NAME, and to delete its oldest "
        "checkpoints beyond its --keep. Prints the directory written. Restore by starting a shard with "
        "--path on that directory (or a copy of it).", argv,
        "Checkpoint", lambda pb, args: pb.CheckpointRequest(name=args.name),
        lambda p: p.add_argument("--name", required=True, help="the checkpoint's name: 1 to 128 characters from "
                                 "A-Z a-z 0-9 . _ - not starting with a dot (for example a date); must not "
                                 "exist yet. It is a name, not a path: the shard decides the directory"))
    if reply is None:
        return 1
    print(reply.directory)
    for name in reply.pruned:
        print(f"deleted older checkpoint {name}", file=sys.stderr)
    return 0


def checkpoints(argv: list[str]) -> int:
    reply = _call(
        "checkpoints",
        "List the checkpoints in a running shard's backup directory, oldest first: name, creation time "
        "(UTC) and size (file sizes added up; SST files shared with the live database count in full).", argv,
        "ListCheckpoints", lambda pb, args: pb.ListCheckpointsRequest())
    if reply is None:
        return 1
    print(f"# {reply.directory}")
    for c in reply.checkpoints:
        print(f"{c.name}\t{c.create_time.ToDatetime().isoformat(timespec='seconds')}Z\t{c.bytes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"checkpoint": checkpoint, "checkpoints": checkpoints}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
