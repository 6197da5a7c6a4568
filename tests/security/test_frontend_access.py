"""The frontend's ports against a caller who does not follow the rules, with real
processes on loopback: one replica, one cache shard and three frontends.

- `guarded`: tokens from a tokens file (`abc#def tenantA`, one for tenantB) and
  the anonymous tenant's from SUTRA_AUTH_TOKEN (not on the command line),
  default settings otherwise, so each tenant's cache is its own; admin port on.
- `shared`: the same tokens with `--share-cache-across-tenants`.
- `open`: no tokens; admin port on.

Each attack is followed by a normal Embed. The admin server's time limits
are tested in-process (a short read timeout instead of 10 s). The admin port
is aiohttp (embedding/http_server.py): a malformed or oversized head is its
400, and it keeps connections alive, so these requests ask it to close.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client.registry import CollectorRegistry

from embedding.admin import AdminServer
from embedding.http_server import MAX_HEADERS, MAX_LINE
from embedding.tenants import Gate, load_access
from harness.procs import ROOT, Proc, free_port
from harness.stack import backends, service
from sutra.embedding.v1 import embedding_service_pb2 as pb
from sutra.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.support import aio

TOKENS = {"tenantA": "abc#def", "tenantB": "b-5f0e7c21", "": "anon-2d94b8"}
TOKENS_FILE = f"""# tenant tokens; a `#` inside a token is part of it
{TOKENS['tenantA']} tenantA
{TOKENS['tenantB']} tenantB   # a comment after whitespace
"""


def frontend(tmp: Path, name: str, replica: Proc, shard: Proc, values: dict, env: dict | None = None,
             admin: bool = True) -> tuple[Proc, int]:
    admin_port = free_port() if admin else 0
    proc = service("embedding", tmp / f"{name}.log",
                   {"mlbase_address": replica.address, "cache_shards": (shard.address,), "admin_port": admin_port,
                    "mlbase_connections": 1, **values})
    proc.env = env or {}
    return proc, admin_port


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontend-access")
    (tmp / "tokens").write_text(TOKENS_FILE)
    replica, shard = backends(tmp)
    tokens = {"auth_tokens_file": str(tmp / "tokens")}
    guarded, guarded_admin = frontend(tmp, "guarded", replica, shard, tokens, env={"SUTRA_AUTH_TOKEN": TOKENS[""]})
    shared, _ = frontend(tmp, "shared", replica, shard, {**tokens, "share_cache_across_tenants": True}, admin=False)
    opened, open_admin = frontend(tmp, "open", replica, shard, {})
    procs = {"replica": replica, "shard": shard, "guarded": guarded, "shared": shared, "open": opened}
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_serving()
        yield {**procs, "guarded_admin": guarded_admin, "open_admin": open_admin}
    finally:
        codes = {name: proc.stop() for name, proc in reversed(procs.items())}
    assert set(codes.values()) == {0}, codes  # every process exits cleanly on SIGTERM


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def embed(proc: Proc, text: str, metadata=()) -> pb.EmbedResponse:
    with grpc.insecure_channel(proc.address) as ch:
        return pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=[text]), metadata=metadata,
                                                      timeout=60)


def usage(proc: Proc, text: str, tenant: str) -> tuple[int, int, int]:
    u = embed(proc, text, bearer(tenant)).usage
    return u.computed, u.l1_hits, u.l2_hits


def fresh(label: str) -> str:
    return f"{label} {uuid.uuid4().hex}"


def still_embeds(proc: Proc, metadata=bearer("tenantA")) -> None:
    assert embed(proc, fresh("after"), metadata).usage.computed == 1


def raw_http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is and read the answer until the server closes: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    lines = "".join(f"{h}\r\n" for h in headers)
    return raw_http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{lines}\r\n".encode())


def no_traceback(proc: Proc) -> None:
    assert "Traceback" not in proc.log(), proc.log()[-3000:]


# --- the admin port: authentication -----------------------------------------------------------

def test_admin_stats_and_metrics_need_a_token_when_tokens_are_configured(stack):
    port = stack["guarded_admin"]
    for path in ("/cache/stats", "/metrics"):
        status, headers, body = get(port, path)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), (path, body)
        for wrong in ("Authorization: Bearer nope", "Authorization: Bearer abc", f"Authorization: {TOKENS['']}",
                      f"Authorization: Basic {TOKENS['']}"):
            status, headers, _ = get(port, path, wrong)
            assert status == 401 and "Bearer" in headers["www-authenticate"], (path, wrong)
        for tenant in TOKENS:  # any accepted token, as for the GetCacheStats RPC
            status, _, body = get(port, path, f"Authorization: Bearer {TOKENS[tenant]}")
            assert status == 200, (path, tenant, body)
    _, _, body = get(port, "/cache/stats", f"authorization: bearer {TOKENS['tenantB']}")
    assert "l1" in json.loads(body)
    assert get(port, "/healthz")[0] == 200  # probes carry no token
    assert get(port, "/nothing-here")[0] == 404
    still_embeds(stack["guarded"])


def test_admin_is_open_without_tokens(stack):
    port = stack["open_admin"]
    for path in ("/cache/stats", "/metrics", "/healthz"):
        assert get(port, path)[0] == 200, path
    still_embeds(stack["open"], ())


# --- the admin port: malformed and oversized requests -----------------------------------------

@pytest.mark.parametrize("label, request_bytes, expected", [
    ("70 KiB request line", b"GET /" + b"a" * (70 << 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("70 KiB request line, no newline", b"GET /" + b"a" * (70 << 10), 400),
    ("huge header", b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * (20 << 10) + b"\r\n\r\n", 400),
    ("header value just over the limit", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (MAX_LINE + 1)
     + b"\r\n\r\n", 400),
    ("too many headers", b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
     + b"\r\n", 400),
    ("garbage", b"\x00\xff\xfe garbage\r\n\r\n", 400),
    ("empty request line", b"\r\n\r\n", 400),
    ("header without colon", b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    ("folded header", b"GET /healthz HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    ("not HTTP", b"GET /healthz SMTP/1.0\r\n\r\n", 400),
    ("no Host in HTTP/1.1", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    ("POST", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    ("cut short", b"GET /healthz HTTP/1.1\r\nHost: x", 400),
])
def test_bad_admin_requests_get_a_4xx_and_no_traceback(stack, label, request_bytes, expected):
    guarded, port = stack["guarded"], stack["guarded_admin"]
    if label in ("cut short", "empty request line"):  # the client half-closes inside the head
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request_bytes)
            s.shutdown(socket.SHUT_WR)
            status = int(s.recv(65536).split()[1])
    else:
        status, _, _ = raw_http(port, request_bytes)
    assert status == expected, label
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/metrics", f"Authorization: Bearer {TOKENS['']}")[0] == 200
    no_traceback(guarded)
    still_embeds(guarded)


def test_a_client_that_sends_a_request_and_half_closes_is_answered(stack):
    with socket.create_connection(("127.0.0.1", stack["open_admin"]), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n")  # no blank line: the end of the stream ends the headers
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536).split(b"\r\n")[0].split()[1] == b"200"


def test_a_request_in_full_then_a_half_close_is_answered(stack):
    with socket.create_connection(("127.0.0.1", stack["open_admin"]), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")


# --- tokens and tenants -----------------------------------------------------------------------

def test_a_hash_inside_a_token_is_part_of_it(stack):
    fe = stack["guarded"]
    still_embeds(fe, bearer("tenantA"))
    with pytest.raises(grpc.RpcError) as err:
        embed(fe, fresh("prefix"), (("authorization", "Bearer abc"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # abc#def is tenantA's, not the anonymous tenant's: their caches are apart.
    text = fresh("whose")
    assert usage(fe, text, "") == (1, 0, 0)
    assert usage(fe, text, "tenantA") == (1, 0, 0)
    assert usage(fe, text, "tenantA") == (0, 1, 0)


def test_tenants_do_not_share_a_cache_by_default(stack):
    fe = stack["guarded"]
    text = fresh("isolated by default")
    assert usage(fe, text, "tenantA") == (1, 0, 0)
    assert usage(fe, text, "tenantA") == (0, 1, 0)
    assert usage(fe, text, "tenantB") == (1, 0, 0)  # no hit: B cannot tell that A embedded it
    assert "cache isolated per tenant" in fe.log()


def test_sharing_the_cache_is_an_explicit_opt_out(stack):
    fe = stack["shared"]
    text = fresh("shared on request")
    assert usage(fe, text, "tenantA") == (1, 0, 0)
    assert usage(fe, text, "tenantB") == (0, 1, 0)
    assert "cache SHARED across tenants" in fe.log()


def test_tokens_stay_off_the_command_line_and_out_of_the_log(stack):
    fe = stack["guarded"]
    still_embeds(fe, bearer(""))  # the token from SUTRA_AUTH_TOKEN works
    cmdline = Path(f"/proc/{fe.pid}/cmdline").read_bytes().decode(errors="replace")
    assert "--auth-tokens-file" in cmdline
    log = fe.log()
    for token in TOKENS.values():
        assert token not in cmdline and token not in log
    assert "bearer tokens required (3 tokens, 3 tenants)" in log


def test_cli_takes_the_token_from_a_file_or_the_environment(stack, tmp_path):
    fe = stack["guarded"]
    (tmp_path / "token").write_text(TOKENS["tenantB"] + "\n")
    base = [sys.executable, "-m", "embedding.cli", "embed", fresh("cli"), "--json", "--address", fe.address]
    env = {"PATH": "/usr/bin", "HOME": str(tmp_path)}
    for extra, more_env in [(["--token-file", str(tmp_path / "token")], {}),
                            ([], {"SUTRA_TOKEN_FILE": str(tmp_path / "token")}),
                            ([], {"SUTRA_AUTH_TOKEN": TOKENS["tenantB"]})]:
        out = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**env, **more_env})
        assert out.returncode == 0, (extra, more_env, out.stderr)
        assert json.loads(out.stdout)["dimensions"] > 0
    out = subprocess.run(base + ["--token-file", str(tmp_path / "missing")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2 and "cannot read token file" in out.stderr


# --- startup refusals -------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, flags, message", [
    ("tenants.yaml", 'tenants:\n  acme:\n    token: "x1"\n    tokens: "abc"\n', ["--tenants-file"],
     "tenant 'acme': `tokens` must be a list (got a string)"),
    ("tokens", "t1 acme extra\n", ["--auth-tokens-file"], ":1: expected `TOKEN [TENANT]`, found 3 fields"),
    (None, None, ["--auth-token", ""], "an empty token"),
    (None, None, ["--isolate-tenants", "--share-cache-across-tenants"], "contradict each other"),
])
def test_a_bad_access_configuration_stops_the_frontend_at_startup(tmp_path, name, content, flags, message):
    if name is not None:
        (tmp_path / name).write_text(content)
        flags = [*flags, str(tmp_path / name)]
    out = subprocess.run([sys.executable, "-m", "embedding", "--port", str(free_port()), "--admin-port", "0",
                          "--mlbase", f"127.0.0.1:{free_port()}", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "abc" not in out.stderr.replace(str(tmp_path), "")


# --- the admin server's time limit, in-process ------------------------------------------------

async def _nothing() -> dict:
    return {}


@aio
async def test_a_slow_or_silent_admin_client_is_cut_off():
    admin = AdminServer("127.0.0.1", 0, _nothing, CollectorRegistry(), ready=lambda: True, read_timeout_s=0.5,
                        gate=Gate(load_access(tokens=["t1"])))
    await admin.start()
    try:
        started = time.monotonic()
        status, _, _ = await asyncio.to_thread(raw_http, admin.port, b"GET /healthz HTTP/1.1\r\n")  # no end
        assert status == 408 and time.monotonic() - started < 5

        def slowloris() -> int:
            with socket.create_connection(("127.0.0.1", admin.port), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
                try:
                    for _ in range(100):  # a header byte every 50 ms: 5 s unless cut off
                        s.sendall(b"X")
                        time.sleep(0.05)
                except OSError:
                    pass
                return int(s.recv(65536).split()[1])

        started = time.monotonic()
        assert await asyncio.to_thread(slowloris) == 408 and time.monotonic() - started < 4
        assert (await asyncio.to_thread(get, admin.port, "/metrics", "Authorization: Bearer t1"))[0] == 200
        assert (await asyncio.to_thread(get, admin.port, "/metrics"))[0] == 401
        status, _, _ = await asyncio.to_thread(raw_http, admin.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                               b"Connection: close\r\n" + b"".join(
            b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 2)) + b"\r\n")
        assert status == 200  # exactly MAX_HEADERS is fine
    finally:
        await admin.close()
