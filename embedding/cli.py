"""Command-line access to the frontend: `embed` and `embed-file`.

    python -m embedding.cli embed "some text" "more text" --dims 128 [--json]
    python -m embedding.cli embed-file corpus.txt --out corpus.npy --dims 256

`embed-file` streams a large file (one text per line; every line is a row,
blank lines included, so row i is line i) through EmbedStream and writes a
float32 .npy of shape (lines, dims) through a memory map, with a progress
bar showing texts/s and the cache hit rate. If the stream breaks with
UNAVAILABLE it resumes from the first unanswered batch.

`add_subcommands(subparsers)` lets the `sutra` console script mount these
commands; `main(argv)` runs them on their own. `--token`, `--tenant` and the
`--tls-*` flags reach a frontend with authentication, tenants or TLS. The
token is best given as a file (`--token-file`, env SUTRA_TOKEN_FILE) or
the SUTRA_AUTH_TOKEN variable: a `--token` value is visible to every local
user in the process list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from common.settings import item
from common.tls import add_client_tls_flags, client_tls_from
from embedding.client import DEFAULT_ADDRESS, Client
from embedding.settings import FrontendSettings


def _address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("SUTRA_EMBEDDING_ADDRESS", DEFAULT_ADDRESS),
                        help="frontend HOST:PORT (env SUTRA_EMBEDDING_ADDRESS; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per call, retries included (default %(default)s)")
    # The frontend's token variable; read from the environment here, never shown as a default in --help.
    token_env = item(FrontendSettings, "auth_tokens").env
    parser.set_defaults(token_env=os.environ.get(token_env, ""))
    parser.add_argument("--token", default="",
                        help=f"bearer token sent as `authorization: Bearer TOKEN`; visible to other local users "
                             f"in the process list, so prefer --token-file or env {token_env} (default none)")
    parser.add_argument("--token-file", type=read_token_file, default=os.environ.get("SUTRA_TOKEN_FILE", ""),
                        metavar="PATH", help="file holding the bearer token (surrounding whitespace ignored); "
                                             "--token wins over it, it over the variable (env SUTRA_TOKEN_FILE; "
                                             "default none)")
    parser.add_argument("--tenant", default=os.environ.get("SUTRA_TENANT", ""),
                        help="x-sutra-tenant header, for a frontend that isolates tenants without tokens "
                             "(env SUTRA_TENANT; default none)")
    add_client_tls_flags(parser, os.environ, prefix="", what="the frontend")


def read_token_file(path: str) -> str:
    """The token in `path` (argparse `type`: a missing, empty or multi-word file is a usage error
    that names the file, never its content)."""
    if not path:
        return ""
    try:
        token = Path(path).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}")
    if not token or len(token.split()) != 1:
        raise argparse.ArgumentTypeError(f"token file {path} must hold one token (it holds "
                                         f"{'nothing' if not token else 'several words'})")
    return token


def client_from(args: argparse.Namespace) -> Client:
    """A Client for the address, timeout, token, tenant and TLS flags above."""
    return Client(args.address, timeout=args.timeout, tls=client_tls_from(args, ""),
                  token=args.token or args.token_file or args.token_env or None, tenant=args.tenant or None)


def add_subcommands(subparsers) -> None:
    """Register `embed` and `embed-file` on an argparse subparsers object."""
    p = subparsers.add_parser("embed", help="embed texts given on the command line",
                              description="Embed each TEXT and print its vector.")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed")
    p.add_argument("--dims", type=int, default=0, help="output width; 0 = the server's default (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (model, dimensions, usage, vectors) instead of text lines")
    _address_flag(p)
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("embed-file", help="embed every line of a file into a .npy",
                              description="Stream FILE (one text per line) through EmbedStream into a "
                                          "float32 .npy of shape (lines, dims).")
    p.add_argument("file", type=Path, metavar="FILE", help="UTF-8 text file, one text per line")
    p.add_argument("--out", type=Path, required=True, help="output .npy path")
    p.add_argument("--dims", type=int, default=0, help="output width; 0 = the server's default (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per stream message (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a summary line is still printed)")
    _address_flag(p)
    p.set_defaults(func=cmd_embed_file)


def cmd_embed(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        out = client.embed_detailed(args.texts, args.dims)
    if args.json:
        doc = {
            "model": out.model, "dimensions": out.dimensions,
            "usage": {"l1_hits": out.l1_hits, "l2_hits": out.l2_hits, "computed": out.computed,
                      "truncated": out.truncated, "duplicates": out.duplicates},
            "embeddings": [{"text": t, "embedding": v.tolist()} for t, v in zip(args.texts, out.vectors)],
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        for text, vec in zip(args.texts, out.vectors):
            print(f"# {text!r} ({out.dimensions} dims, model {out.model})")
            print(" ".join(f"{x:.6f}" for x in vec))
    return 0


def count_lines(path: Path) -> int:
    """Rows embed-file will write: like str.splitlines on '\\n' (a final newline adds no row)."""
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (0 if last == b"\n" else 1)


def read_batches(path: Path, batch_size: int, skip: int) -> Iterator[list[str]]:
    batch: list[str] = []
    with path.open("r", encoding="utf-8", newline="\n") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            batch.append(line.rstrip("\n").rstrip("\r"))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def cmd_embed_file(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    total = count_lines(args.file)
    with client_from(args) as client:
        dims = args.dims or client.info().default_width
        out = np.lib.format.open_memmap(args.out, mode="w+", dtype=np.float32, shape=(total, dims))
        done = hits = looked = 0
        started = time.monotonic()
        bar = tqdm(total=total, unit="text", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
        failures = 0
        while done < total:
            try:
                for vectors, response in client.stream(read_batches(args.file, args.batch_size, done), dims):
                    n = vectors.shape[0]
                    out[done:done + n] = vectors
                    done += n
                    u = response.usage
                    hits += u.l1_hits + u.l2_hits
                    looked += u.l1_hits + u.l2_hits + u.computed
                    bar.update(n)
                    bar.set_postfix(hit_rate=f"{hits / looked:.1%}" if looked else "n/a", refresh=False)
                    failures = 0
            except grpc.RpcError as exc:
                failures += 1
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures > client.retries:
                    bar.close()
                    print(f"embed-file: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                time.sleep(client.backoff * 2 ** failures)
        bar.close()
        out.flush()
        del out
    elapsed = time.monotonic() - started
    rate = total / elapsed if elapsed > 0 else 0.0
    hit_rate = hits / looked if looked else 0.0
    print(f"wrote {args.out} ({total} x {dims} float32) in {elapsed:.1f}s: {rate:.0f} texts/s, "
          f"cache hit rate {hit_rate:.1%}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedding.cli",
                                     description="Embed texts with a running sutra-embed frontend.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subcommands(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
