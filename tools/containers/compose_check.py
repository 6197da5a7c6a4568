"""`make compose-check`, host side: run the compose stack in real containers, validate it
from the host, kill a replica and a cache shard under load, remove everything, print one
summary line.

    python -m tools.containers.compose_check [--compose CMD] [--image-tag TAG]

The images must exist (tools/containers/build_images.sh; `make compose-check` builds
them first). The checks are the seed's validation phases that apply to a stack not
run by our supervisord (deploy/validate.py), through the frontend's public port:

  phase 0  every allowed width: unit vectors of that width; a bad width refused
           (deploy.validate.Validator.phase0, unchanged)
  phase 1  repeated texts are L1 hits; after the frontend restarts (its stop flushes the
           write-backs), every cache shard restarts and the frontend restarts again (empty
           L1), the same texts come back as L2 hits with nothing computed; every shard
           holds entries, and together at least two per text (--l2-copies 2)
  phase 2  HAProxy (its stats page) lists every replica UP, and cold requests reach each
  kill     steady load from several clients; one replica container gets SIGKILL; the
           load goes on until HAProxy has marked it DOWN and more requests have passed;
           not one request may fail
  shard    texts computed once, their write-backs flushed by a frontend restart (which
           also empties L1); steady load; one shard container gets SIGKILL; more requests
           pass, then the texts come back as L2 hits with nothing computed (each has a
           second copy on a live shard) and not one request has failed
Exit status 0 only when every check passed and nothing of the project is left.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable

import grpc

from deploy.settings import StackSettings
from deploy.validate import PhaseResult, Validator, sample_sentences, until_every_replica_answers
from harness.load import Load
from tools.containers import haproxy_stats
from sutra.embedding.v1 import embedding_service_pb2 as pb
from tools.containers.compose_stack import ComposeStack, command_flag, docker, services_running

REPLICAS = 3
# The compose file's cache shards (cacheshard-0, -1, ...), and how many hold each entry.
SHARDS = services_running("cacheshard")
COPIES = int(command_flag("embedding", "--l2-copies"))
SHARD_METRICS_PORT = int(command_flag(SHARDS[0], "--metrics-port"))
HEALTH_TIMEOUT = 600.0  # first start on a loaded 2-core host: three replicas load the model at once


def steady_load(validator: Validator, clients: int = 4, max_calls: int = 5000) -> Load:
    """`clients` threads, each sending Embed calls of fresh texts (native width, through the validator's
    channel) one after another until stopped or `max_calls` in all (a bounded loop); every failure is recorded."""
    tag = uuid.uuid4().hex[:8]
    return Load(stub=validator.stub, threads=clients, timeout=validator.timeout, width=0, max_calls=max_calls,
                make_texts=lambda index, n: sample_sentences(2, f"load-{tag}-{index}-{n}"))


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)


class ComposeCheck:
    def __init__(self, stack: ComposeStack, out: Callable[[str], None] = print) -> None:
        self.stack, self.out = stack, out
        self.validator = Validator(StackSettings(), stack.grpc_address, out, timeout=30.0)

    def wait_replicas_up(self, count: int, timeout: float = 120.0) -> list:
        views: list = []

        def all_up() -> bool:
            nonlocal views
            try:
                views = haproxy_stats.servers(self.stack.stats_url)
            except OSError:
                return False
            return len(views) == count and all(v.up for v in views)
        wait_for(all_up, timeout, f"HAProxy: {count} replicas UP")
        return views

    def phase1(self, unique: int = 24, rounds: int = 4) -> PhaseResult:
        result = PhaseResult(1)
        texts = sample_sentences(unique, uuid.uuid4().hex[:8])
        totals = self.validator.run_rounds(texts, rounds)
        self.out(f"  {rounds} rounds over {unique} new texts: computed {totals['computed']}, "
                 f"L1 hits {totals['l1_hits']}")
        result.check("first sight computed once", totals["computed"] == unique, str(totals))
        result.check("L1 hit rate", totals["l1_hits"] == (rounds - 1) * unique, str(totals))
        self.out(f"  restarting the frontend (flushes write-backs), the {len(SHARDS)} cache shards, "
                 "the frontend again")
        for services in (["embedding"], SHARDS, ["embedding"]):
            self.stack.restart(*services)
            self.stack.wait_healthy({service: 1 for service in services}, timeout=120)
        again = self.validator.run_rounds(texts, 1)
        self.out(f"  after restarts: L2 hits {again['l2_hits']}/{unique}, computed {again['computed']}")
        result.check("L2 hits after shard and frontend restarts",
                     again["l2_hits"] == unique and again["computed"] == 0, str(again))
        warm = self.validator.run_rounds(texts, 1)
        result.check("L1 refilled from L2", warm["l1_hits"] == unique, str(warm))
        # Read after the restarts: what each shard holds is what it kept on disk.
        entries = {service: self.shard_metric(service, "sutra_cacheshard_entries") for service in SHARDS}
        self.out("  entries per shard: " + ", ".join(f"{s} {n:.0f}" for s, n in entries.items()))
        result.check("every shard holds entries", all(n > 0 for n in entries.values()), str(entries))
        result.check(f"{COPIES} copies of each text across the shards", sum(entries.values()) >= COPIES * unique,
                     f"{sum(entries.values()):.0f} entries < {COPIES} x {unique}")
        return result

    def shard_metric(self, service: str, name: str) -> float:
        """One unlabelled value from a shard's /metrics, read inside its container (the shards
        publish no port)."""
        [shard] = self.stack.containers(service)
        text = docker("exec", shard["Id"], "python", "-c",
                      "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                      f"'http://127.0.0.1:{SHARD_METRICS_PORT}/metrics', timeout=10).read().decode())")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return float(parts[1])
        raise KeyError(f"{service}: no {name} on /metrics")

    def phase2(self, max_requests: int = 400) -> PhaseResult:
        result = PhaseResult(2)
        views = self.wait_replicas_up(REPLICAS)
        self.out("  " + ", ".join(f"{v.name} {v.address} {v.status}" for v in views))
        result.check(f"{REPLICAS} replicas listed, all UP", len(views) == REPLICAS and all(v.up for v in views),
                     str([(v.name, v.status) for v in views]))
        # A replica has done work once it has sent back at least one request's vectors (4 texts at
        # full width, float32): more than a TLS handshake or HTTP/2 pings could account for.
        info = self.validator.stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        one_request = 4 * 4 * info.native_width
        sent, reached = until_every_replica_answers(
            self.validator.embed, lambda: haproxy_stats.servers(self.stack.stats_url), views, one_request,
            max_requests)
        self.out(f"  {sent} cold requests; bytes each replica sent back: {reached}")
        result.check("requests reach every replica", bool(reached) and all(d >= one_request for d in reached.values()),
                     str(reached))
        return result

    def http_api(self) -> PhaseResult:
        result = PhaseResult(3)
        request = urllib.request.Request(f"{self.stack.http_url}/v1/embeddings", method="POST",
                                         data=b'{"input": ["hello from compose-check"], "dimensions": 64}',
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = json.loads(reply.read())
        width = len(body["data"][0]["embedding"])
        result.check("HTTP /v1/embeddings on the published port", width == 64, f"width {width}")
        return result

    def kill_under_load(self, settle_requests: int = 200) -> tuple[PhaseResult, Load]:
        result = PhaseResult(4)
        victim = self.stack.containers("mlbase")[0]
        name = victim["Name"].lstrip("/")
        address = next(iter(victim["NetworkSettings"]["Networks"].values()))["IPAddress"]
        with steady_load(self.validator) as load:
            wait_for(lambda: len(load.calls) >= 50, 120, "steady load started")
            docker("kill", name)
            killed_at = len(load.calls)
            self.out(f"  SIGKILL {name} ({address}) after {killed_at} requests")

            def marked_down() -> bool:
                views = haproxy_stats.servers(self.stack.stats_url)
                return not any(v.address.startswith(f"{address}:") and v.up for v in views)
            wait_for(marked_down, 60, f"HAProxy marks {name} DOWN")
            down_at = len(load.calls)
            wait_for(lambda: len(load.calls) >= down_at + settle_requests, 300, "requests after the kill")
        self.out(f"  {load.ok} requests ok, {len(load.failures())} failed "
                 f"({len(load.calls) - killed_at} after the kill)")
        result.check("no failed request while a replica was killed", not load.failures(),
                     "; ".join(load.details[:5]))
        return result, load

    def shard_kill_under_load(self, warm_texts: int = 48, settle_requests: int = 100) -> PhaseResult:
        result = PhaseResult(5)
        texts = sample_sentences(warm_texts, uuid.uuid4().hex[:8])
        first = self.validator.run_rounds(texts, 1)
        result.check("new texts computed", first["computed"] == warm_texts, str(first))
        # The frontend's stop stores every queued write-back (on both copies) and empties L1.
        self.stack.restart("embedding")
        self.stack.wait_healthy({"embedding": 1}, timeout=120)
        [victim] = self.stack.containers(SHARDS[0])
        name = victim["Name"].lstrip("/")
        with steady_load(self.validator) as load:
            wait_for(lambda: len(load.calls) >= 30, 120, "steady load started")
            docker("kill", name)
            killed_at = len(load.calls)
            self.out(f"  SIGKILL {name} after {killed_at} requests")
            wait_for(lambda: len(load.calls) >= killed_at + settle_requests, 300, "requests after the shard kill")
            again = self.validator.run_rounds(texts, 1)
            self.out(f"  {warm_texts} texts again: L2 hits {again['l2_hits']}, computed {again['computed']}")
            after = len(load.calls)
            wait_for(lambda: len(load.calls) >= after + settle_requests // 2, 300, "requests after the lookups")
        self.out(f"  {load.ok} requests ok, {len(load.failures())} failed "
                 f"({len(load.calls) - killed_at} after the kill)")
        result.check("L2 hits from the second copies with a shard gone",
                     again["l2_hits"] == warm_texts and again["computed"] == 0, str(again))
        result.check("no failed request while a shard was killed", not load.failures(),
                     "; ".join(load.details[:5]))
        return result

    def run(self) -> tuple[bool, dict]:
        facts: dict = {}
        ok = True
        for label, step in (("phase 0", self.validator.phase0), ("phase 1", self.phase1), ("phase 2", self.phase2),
                            ("http", self.http_api), ("kill", lambda: self.kill_under_load()[0]),
                            ("shard kill", self.shard_kill_under_load)):
            self.out(f"{label}:")
            try:
                res = step()
            except (grpc.RpcError, OSError, TimeoutError, RuntimeError, KeyError, ValueError) as exc:
                res = PhaseResult(0)
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                res.check("ran to the end", False, detail)
            for name, passed, detail in res.checks:
                self.out(f"  [{'PASS' if passed else 'FAIL'}] {name}" + (f"  ({detail})" if detail and not passed else ""))
            facts[label] = res.passed
            ok &= res.passed
        return ok, facts

    def close(self) -> None:
        self.validator.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.containers.compose_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", default=os.environ.get("SUTRA_COMPOSE", "docker-compose"),
                        help="compose command line (env SUTRA_COMPOSE; default docker-compose)")
    parser.add_argument("--image-tag", default=os.environ.get("SUTRA_IMAGE_TAG", "0.1.0"))
    parser.add_argument("--project", default=f"sutra-check-{os.getpid()}", help="compose project name")
    parser.add_argument("--build-seconds", default=os.environ.get("SUTRA_BUILD_SECONDS", ""),
                        help="how long the image build took, for the summary line (env SUTRA_BUILD_SECONDS)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    stack = ComposeStack(args.project, shlex.split(args.compose), args.image_tag)
    print(f"compose project {stack.project}: gRPC {stack.grpc_address}, HTTP {stack.http_url}, "
          f"stats {stack.stats_url}")
    ok, facts, healthy_s, left = False, {}, 0.0, ["not torn down"]
    try:
        stack.up()
        stack.wait_healthy({**{shard: 1 for shard in SHARDS}, "mlbase": REPLICAS, "haproxy": 1, "embedding": 1},
                           HEALTH_TIMEOUT)
        healthy_s = time.monotonic() - start
        print(f"healthy after {healthy_s:.0f} s")
        check = ComposeCheck(stack)
        try:
            ok, facts = check.run()
        finally:
            check.close()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"stack failed: {exc}", file=sys.stderr)
        for c in stack.containers(all_states=True):
            print(f"--- {c['Name'].lstrip('/')} ({c['State']['Status']}), last lines:", file=sys.stderr)
            print(docker("logs", "--tail", "15", c["Id"], check=False), file=sys.stderr)
    finally:
        left = stack.down()
    clean = not left
    steps = " ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in facts.items()) or "no checks ran"
    built = f"images built in {args.build_seconds} s; " if args.build_seconds else ""
    shape = f"{REPLICAS} replicas + haproxy + {len(SHARDS)} shards (copies {COPIES}) + frontend"
    teardown = "clean" if clean else "LEFT " + ", ".join(left)
    print(f"compose-check: {'PASS' if ok and clean else 'FAIL'}: {built}{shape} healthy in {healthy_s:.0f} s; "
          f"{steps}; teardown {teardown}; stack {time.monotonic() - start:.0f} s")
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
