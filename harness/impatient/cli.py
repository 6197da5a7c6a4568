"""`python -m harness.impatient`: flags, the run, the post-conditions and the JSON summary."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

from harness.impatient import __doc__ as DESCRIPTION
from harness.impatient.metrics import gauge_view, poll_idle, sample_metrics, scrape
from harness.impatient.mix import CRASH_CODES, OVERSIZE_CODES, plan
from harness.impatient.traffic import Run


def _range(text: str, kind: type, lowest: float, unit: str) -> tuple:
    """'LO,HI' -> (lo, hi) of `kind`, with lowest <= LO <= HI; an argparse error otherwise."""
    try:
        lo, hi = (kind(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI {unit}, got {text!r}") from None
    if lo < lowest or hi < lo:
        raise argparse.ArgumentTypeError(f"need {lowest:g} <= LO <= HI, got {text!r}")
    return lo, hi


def ms_range(text: str) -> tuple[float, float]:
    """'LO,HI' in milliseconds -> (lo, hi) seconds."""
    lo, hi = _range(text, float, 0, "in milliseconds")
    return lo / 1000.0, hi / 1000.0


def int_range(text: str) -> tuple[int, int]:
    return _range(text, int, 1, "integers")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.impatient", description=DESCRIPTION,
        epilog="Ranges are LO,HI (uniform). Exit code: 0 all post-conditions hold, 1 one failed, 2 bad flags.",
        formatter_class=_Formatter)
    p.add_argument("--target", required=True, help="frontend gRPC address HOST:PORT")
    p.add_argument("--metrics-url", default="",
                   help="frontend admin /metrics URL (e.g. http://127.0.0.1:9100/metrics); enables the "
                        "idle-gauge check before and after the traffic")
    p.add_argument("--seed", type=int, default=1, help="seed for every text, deadline, delay and choice")
    p.add_argument("--text-salt", default="",
                   help="mixed into every seeded text; change it to replay a seed against a server whose "
                        "caches already hold that seed's texts")
    p.add_argument("--width", type=int, default=0, help="`dimensions` of every request (0 = server default)")
    g = p.add_argument_group("mix (counts of each kind)")
    g.add_argument("--singles", type=int, default=1500, help="single-text Embed calls with --deadline-ms deadlines")
    g.add_argument("--cancelled", type=int, default=200, help="Embed calls cancelled after --cancel-after-ms")
    g.add_argument("--stream-cancels", type=int, default=0,
                   help="EmbedStreams that send --stream-requests requests, then are cancelled mid-stream")
    g.add_argument("--abandoned", type=int, default=40,
                   help="EmbedStreams that send --stream-requests requests and are abandoned (never "
                        "half-closed, never read)")
    g.add_argument("--groups", type=int, default=0,
                   help="leader/follower groups: --group-size callers ask for one fresh text at once")
    g.add_argument("--oversized", type=int, default=0,
                   help="oversized calls: an input over max_chars, or a message over 4 MiB")
    t = p.add_argument_group("timing")
    t.add_argument("--deadline-ms", type=ms_range, default="1,12", help="deadline range of singles and group callers")
    t.add_argument("--deadline-dist", choices=("uniform", "log"), default="uniform",
                   help="how deadlines are drawn from --deadline-ms: uniform, or log-uniform (as many in "
                        "1-10 ms as in 100-1000 ms: a wide range that still keeps many calls impatient)")
    t.add_argument("--cancel-after-ms", type=ms_range, default="0,50",
                   help="delay before a cancelled call or stream is cancelled")
    t.add_argument("--cancel-deadline-ms", type=float, default=5000.0,
                   help="deadline of cancelled calls (so a lost cancel still ends)")
    t.add_argument("--stream-requests", type=int_range, default="1,4",
                   help="requests sent on each cancelled or abandoned stream")
    t.add_argument("--group-size", type=int_range, default="3,6", help="callers per leader/follower group")
    t.add_argument("--group-long-deadline-ms", type=float, default=1000.0,
                   help="about a third of group callers use this deadline instead of --deadline-ms, so a "
                        "follower outlives a leader that gives up")
    t.add_argument("--duration-s", type=float, default=15.0,
                   help="spread the start times over this many seconds (seeded, uniform); a steady arrival "
                        "keeps deadlines expiring at every stage of a call, which a single burst does not; "
                        "0 = one burst, as fast as --concurrency allows")
    t.add_argument("--concurrency", type=int, default=64, help="operations in flight at once (client side)")
    post = p.add_argument_group("after the traffic")
    post.add_argument("--hold-abandoned-s", type=float, default=0.0,
                      help="keep the abandoned streams' channel open this long after the traffic (released "
                           "earlier once /metrics shows every gauge idle); 0 = close it when the traffic ends, "
                           "which ends them by client disconnect")
    post.add_argument("--probe-budget-s", type=float, default=10.0,
                      help="total time for the new-text probe (1 s deadline per attempt, a new text each try)")
    post.add_argument("--idle-timeout-s", type=float, default=15.0,
                      help="how long after the traffic the gauges may take to reach their idle values")
    post.add_argument("--expect-free-slots", type=int, default=8,
                      help="idle value of sutra_embedding_free_batch_slots (the frontend's --mlbase-concurrency)")
    post.add_argument("--metrics-every-s", type=float, default=2.0,
                      help="sample /metrics this often during the traffic (peaks go in the summary); 0 = never")
    return p


async def main_async(args: argparse.Namespace) -> dict:
    run = Run(args)
    url, free = args.metrics_url, args.expect_free_slots
    summary: dict = {"seed": args.seed, "target": args.target}
    metrics: dict = {}
    if url:
        try:
            metrics["before"], metrics["idle_before"] = gauge_view(await asyncio.to_thread(scrape, url), free)
        except Exception as exc:  # noqa: BLE001
            metrics["before"], metrics["idle_before"] = {"scrape_error": str(exc)}, False
    ops = plan(args, await run.max_chars())
    summary["planned"] = dict(Counter(op.kind for op in ops))
    print(f"impatient: seed {args.seed}, {len(ops)} operations {summary['planned']}", file=sys.stderr)

    stop_sampling = asyncio.Event()
    peaks: dict = {}
    sampler = (asyncio.create_task(sample_metrics(url, free, stop_sampling, args.metrics_every_s, peaks))
               if url and args.metrics_every_s > 0 else None)
    summary.update(await run.drive(ops))
    traffic_end = time.monotonic()
    stop_sampling.set()
    if sampler is not None:
        await sampler

    released = asyncio.Event()
    idle_seen = asyncio.Event()
    hold: dict = {"held_s": None, "at_release": None}

    async def hold_abandoned() -> None:
        try:
            await asyncio.wait_for(idle_seen.wait(), max(0.0, args.hold_abandoned_s))
        except asyncio.TimeoutError:
            pass
        hold["held_s"] = round(time.monotonic() - traffic_end, 3)
        hold["at_release"] = await run.abandoned_state()
        await run.abandon_channel.close()
        released.set()

    holder = asyncio.create_task(hold_abandoned())
    summary["new_text"] = await run.probe()
    summary["health"] = {"": await run.health(""), "liveness": await run.health("liveness")}
    if url:
        after = await poll_idle(url, free, traffic_end, args.idle_timeout_s)
        metrics["after"], metrics["idle_after"], metrics["idle_after_s"] = (
            after["gauges"], after["idle"], after["idle_after_s"])
        if "scrape_error" in after:
            metrics["scrape_error"] = after["scrape_error"]
        if after["idle"]:
            idle_seen.set()
        metrics["peaks_during_traffic"] = peaks
    await holder
    if url and not metrics["idle_after"]:
        # Informative: what a client disconnect does that the server's own clean-up did not.
        metrics["after_release"] = (await poll_idle(url, free, time.monotonic(), 5.0))["gauges"]
    await run.channel.close()

    summary["sent"] = dict(run.sent)
    summary["codes"] = {kind: dict(c) for kind, c in sorted(run.codes.items())}
    summary["extra"] = {kind: dict(c) for kind, c in sorted(run.extra.items())}
    summary["details"] = dict(run.details)
    summary["abandoned"] = {"count": len(run.abandoned_calls), "hold_s": args.hold_abandoned_s, **hold}
    if url:
        summary["metrics"] = metrics
    all_codes = Counter()
    for c in run.codes.values():
        all_codes.update(c)
    summary["code_mix"] = dict(all_codes)
    post = {
        "new_text_ok": summary["new_text"]["ok"],
        "health_serving": summary["health"][""] == "SERVING",
        "no_crash_codes": not (set(all_codes) & CRASH_CODES),
        "oversized_as_expected": set(run.codes.get("oversized", {})) <= OVERSIZE_CODES,
        "no_client_errors": "CLIENT_ERROR" not in all_codes and summary["stragglers"] == 0,
    }
    if url:
        post["gauges_idle"] = bool(metrics["idle_after"])
    if args.hold_abandoned_s > 0 and run.abandoned_calls:
        # Held open, so only the server (its idle timeout, or an error) can have ended them.
        post["abandoned_ended_by_server"] = "STILL_OPEN" not in hold["at_release"]
    summary["postconditions"] = post
    summary["ok"] = all(post.values())
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        build_parser().error("--concurrency must be at least 1")
    summary = asyncio.run(main_async(args))
    print(json.dumps(summary, indent=1, sort_keys=False))
    return 0 if summary["ok"] else 1
