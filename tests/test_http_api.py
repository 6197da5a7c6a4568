"""The OpenAI-compatible HTTP API with real clients, against real processes on loopback.

One replica (the bundled model, one thread), one cache shard and three frontends with
the HTTP API on, started once for the module:
- `api`: a bearer token (from SUTRA_AUTH_TOKEN), default limits: the clients (the
  official `openai` package, LangChain's `OpenAIEmbeddings`, curl) must get exactly the
  vectors gRPC's Embed returns, with the replica tokenizer's token counts;
- `tiny`: `--max-pending 1`, so two new texts in one request are refused with 429;
- `starting`: its ML-base address answers nothing, so it stays unready (503).
Then every error status, a hypothesis pass over the JSON body, and after each storm a
normal request still works.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deploy.scrape import fetch
from embedding.client import Client
from embedding.token_counts import TokenCounter
from harness.impatient.metrics import gauge_view
from harness.procs import ROOT, Proc, free_port, wait_until
from harness.stack import backends, service
from mlbase.settings import bundled_model_path

TOKEN = "sk-sutra-http-4c1d"
MAX_BODY = 4 * 1024 * 1024  # the frontend's default --max-message-bytes
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


class Frontend:
    def __init__(self, proc: Proc, http_port: int, admin_port: int = 0) -> None:
        self.proc = proc
        self.http_port = http_port
        self.admin_port = admin_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def openai(self, token: str = TOKEN, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0, **kwargs)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                token: str | None = TOKEN, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: status, headers (lower-case names), body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            sent = {"Content-Type": "application/json", **(headers or {})}
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=data, headers=sent)
            reply = conn.getresponse()
            return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
        finally:
            conn.close()

    def embed(self, body: bytes | dict, **kwargs) -> tuple[int, dict[str, str], dict]:
        status, headers, raw = self.request("POST", "/v1/embeddings", body, **kwargs)
        return status, headers, json.loads(raw)


def start_frontend(tmp: Path, name: str, values: dict, env: dict | None = None, admin: bool = False) -> Frontend:
    http_port, admin_port = free_port(), free_port() if admin else 0
    proc = service("embedding", tmp / f"{name}.log", {"admin_port": admin_port, "http_port": http_port,
                                                      "mlbase_connections": 1, **values})
    proc.env = env or {}
    return Frontend(proc, http_port, admin_port)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-api")
    replica, shard = backends(tmp)
    backend = {"mlbase_address": replica.address, "cache_shards": (shard.address,)}
    fronts = {
        "api": start_frontend(tmp, "api", backend, env={"SUTRA_AUTH_TOKEN": TOKEN}, admin=True),
        "tiny": start_frontend(tmp, "tiny", {**backend, "max_pending": 1}),
        "starting": start_frontend(tmp, "starting", {"mlbase_address": f"127.0.0.1:{free_port()}",
                                                     "cache_shards": ()}),
    }
    procs = [replica, shard, *(f.proc for f in fronts.values())]
    try:
        for proc in procs:
            proc.start()
        for proc in procs[:-1]:
            proc.wait_serving()
        starting = fronts["starting"]
        wait_until(lambda: _answers(starting.http_port), 30, "the unready frontend's HTTP port")
        yield fronts | {"replica": replica}
    finally:
        codes = {proc.log_path.stem: proc.stop() for proc in reversed(procs)}
    assert set(codes.values()) == {0}, codes  # every process exits cleanly on SIGTERM
    for front in fronts.values():
        assert "Traceback" not in front.proc.log(), front.proc.log()[-3000:]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def api(live) -> Frontend:
    return live["api"]


@pytest.fixture(scope="module")
def model(api) -> dict:
    status, _, body = api.request("GET", "/v1/models")
    assert status == 200, body
    return json.loads(body)["data"][0]


@pytest.fixture(scope="module")
def replica_counts(model):
    """Token counts as the replica's own tokenizer code makes them (mlbase/backends/tokens.py)."""
    from transformers import AutoTokenizer

    from mlbase.backends.tokens import TextTokenizer

    tokenizer = TextTokenizer(AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True),
                              model["max_seq_length"])
    return lambda texts: [e.length for e in tokenizer.encode(texts)]


def fresh(n: int, label: str = "http") -> list[str]:
    return [f"{label} {i} {uuid.uuid4().hex}" for i in range(n)]


def grpc_vectors(api: Frontend, texts: list[str], dimensions: int = 0) -> np.ndarray:
    with Client(api.proc.address, token=TOKEN, timeout=60) as client:
        return client.embed(texts, dimensions)


def still_works(front: Frontend, token: str | None = TOKEN) -> None:
    status, headers, body = front.embed({"input": fresh(1, "after"), "dimensions": 64}, token=token)
    assert status == 200 and headers["x-sutra-computed"] == "1", body
    assert len(body["data"][0]["embedding"]) == 64


# --- the official openai client, LangChain and curl get gRPC's vectors -------------------------

@pytest.mark.parametrize("encoding", ["float", "base64", None])  # None: the client's default (base64)
@pytest.mark.parametrize("dimensions", [64, 256, 384, None])
def test_openai_client_gets_the_grpc_vectors(api, model, replica_counts, dimensions, encoding):
    texts = fresh(3) + [f"Ünïcödé, emoji 🙂 and 中文 {uuid.uuid4().hex}"]
    options = {k: v for k, v in (("dimensions", dimensions), ("encoding_format", encoding)) if v is not None}
    raw = api.openai().embeddings.with_raw_response.create(model=model["id"], input=texts, **options)
    reply = raw.parse()
    rows = [d.embedding for d in reply.data]
    if encoding == "base64":  # asked for explicitly, the client hands the strings over as they are
        rows = [np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows]
    got = np.array(rows, dtype=np.float32)
    want = grpc_vectors(api, texts, dimensions or 0)
    assert got.shape == (len(texts), dimensions or model["default_width"])
    np.testing.assert_array_equal(got, want)
    assert [d.index for d in reply.data] == list(range(len(texts))) and reply.object == "list"
    assert reply.model == model["id"]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(replica_counts(texts))
    assert raw.headers["x-sutra-computed"] == str(len(texts)) and raw.headers["x-request-id"]


def test_usage_counts_the_tokens_the_model_reads(api, replica_counts):
    long = "a very long text that goes past the model window " * 80
    texts = [*fresh(2), long, "", "same", "same"]
    status, headers, body = api.embed({"input": texts, "model": "anything"})
    assert status == 200, body
    counts = replica_counts(texts)
    assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    assert max(counts) == replica_counts([long])[0] < len(long.split())  # cut at the model window
    assert headers["x-sutra-truncated"] == "1" and headers["x-sutra-duplicates"] == "1"
    # The second time every text is an L1 hit; the counts do not change.
    status, headers, again = api.embed({"input": texts})
    assert again["usage"] == body["usage"] and headers["x-sutra-l1-hits"] == "5"
    assert headers["x-sutra-computed"] == "0" and headers["x-sutra-l2-hits"] == "0"


def test_the_frontend_counts_tokens_as_the_replica_does(model, replica_counts):
    counter = TokenCounter.load(bundled_model_path())
    counter.configure(model["max_seq_length"], model["id"])
    texts = ["", "hello", "Ünïcödé, emoji 🙂 and 中文", "   spaces   ", "[CLS] [SEP]", "word " * 1000,
             "x" * 5000, "e\u0301\u0301", "\x00\ufeff\u200b"]
    assert counter.count_now(texts) == counter.count_now(texts) == replica_counts(texts)


def test_openai_client_lists_the_model(api, model):
    listed = api.openai().models.list()
    assert [m.id for m in listed.data] == [model["id"]]
    assert api.openai().models.retrieve(model["id"]).id == model["id"]
    with pytest.raises(openai.NotFoundError):
        api.openai().models.retrieve("text-embedding-3-small")


def test_langchain_openai_embeddings_get_the_grpc_vectors(api, model):
    from langchain_openai import OpenAIEmbeddings

    texts = fresh(3, "langchain")
    embeddings = OpenAIEmbeddings(model=model["id"], base_url=api.base_url, api_key=TOKEN, dimensions=128,
                                  check_embedding_ctx_length=False, max_retries=0)
    documents = np.array(embeddings.embed_documents(texts), dtype=np.float32)
    query = np.array(embeddings.embed_query(texts[0]), dtype=np.float32)
    want = grpc_vectors(api, texts, 128)
    np.testing.assert_array_equal(documents, want)
    np.testing.assert_array_equal(query, want[0])


def curl(*args: str) -> subprocess.CompletedProcess:
    found = shutil.which("curl")
    assert found, "curl is needed (Debian: apt-get install curl)"
    return subprocess.run([found, "-sS", *args], capture_output=True, text=True, timeout=60)


def test_curl(api, model):
    texts = fresh(2, "curl")
    out = curl("-D", "-", f"{api.base_url}/embeddings", "-H", f"Authorization: Bearer {TOKEN}",
               "-H", "Content-Type: application/json", "-H", "x-request-id: curl-42",
               "-d", json.dumps({"input": texts, "model": model["id"], "dimensions": 96}))
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n\n")  # text mode: curl's CRLFs read as newlines
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head.splitlines()[1:])}
    assert head.startswith("HTTP/1.1 200") and headers["x-request-id"] == "curl-42"
    assert headers["x-sutra-computed"] == "2" and headers["content-type"].startswith("application/json")
    got = np.array([d["embedding"] for d in json.loads(body)["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, grpc_vectors(api, texts, 96))
    # Probes need no token, and HEAD answers without a body.
    for path in ("/health", "/ready"):
        assert curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{api.http_port}{path}").stdout == "200"
        status, _, body = api.request("HEAD", path, token=None)
        assert status == 200 and body == b""


# --- every error status, OpenAI's error shape -------------------------------------------------

def assert_error(status: int, body: dict, expected: int, code: str | None = None, param: str | None = None) -> None:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("body, code, param", [
    ({"input": []}, "invalid_argument", "input"),
    ({"model": "m"}, "invalid_input", "input"),
    ({"input": [1, 2, 3]}, "invalid_input", "input"),  # token arrays
    ({"input": ["a", None]}, "invalid_input", "input"),
    ({"input": "x", "dimensions": 4096}, "invalid_argument", "dimensions"),  # wider than the model
    ({"input": "x", "dimensions": 8}, "invalid_argument", "dimensions"),  # narrower than min_width
    ({"input": "x", "dimensions": 0}, "invalid_dimensions", "dimensions"),
    ({"input": "x", "dimensions": "64"}, "invalid_dimensions", "dimensions"),
    ({"input": "x", "dimensions": True}, "invalid_dimensions", "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "invalid_encoding_format", "encoding_format"),
    ({"input": "x", "model": 3}, "invalid_request", "model"),
    ({"input": ["x" * 100_001]}, "invalid_argument", "input"),  # over max_chars
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (b"", "invalid_json", None),
])
def test_bad_requests_get_400(api, body, code, param):
    status, _, answer = api.embed(body)
    assert_error(status, answer, 400, code, param)
    assert answer["error"]["type"] == "invalid_request_error"


def test_an_over_wide_width_is_refused_by_the_openai_client_too(api, model):
    with pytest.raises(openai.BadRequestError) as err:
        api.openai().embeddings.create(model=model["id"], input=["x"], dimensions=model["native_width"] + 1)
    assert err.value.status_code == 400 and err.value.body["param"] == "dimensions"
    assert "allowed" in err.value.body["message"]


@pytest.mark.parametrize("token", [None, "sk-wrong", ""])
def test_no_or_a_wrong_token_gets_401(api, token):
    for method, path, body in (("POST", "/v1/embeddings", {"input": "x"}), ("GET", "/v1/models", None)):
        status, headers, raw = api.request(method, path, body, token=token)
        assert_error(status, json.loads(raw), 401, "unauthenticated")
        assert headers["www-authenticate"].startswith('Bearer realm="sutra"')
        assert ("invalid_token" in headers["www-authenticate"]) == (token is not None)
    with pytest.raises(openai.AuthenticationError):
        api.openai(token="sk-wrong").embeddings.create(model="m", input=["x"])
    still_works(api)


def test_a_body_over_the_limit_gets_413_before_it_is_read(api):
    big = json.dumps({"input": ["a" * 1000] * (MAX_BODY // 1000 + 10)}).encode()
    status, _, body = api.embed(big)
    assert_error(status, body, 413, "request_too_large")
    # Without Content-Length (chunked), the limit stops the read.
    conn = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=60)
    try:
        conn.request("POST", "/v1/embeddings", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                     encode_chunked=True)
        reply = conn.getresponse()
        assert_error(reply.status, json.loads(reply.read()), 413, "request_too_large")
    finally:
        conn.close()
    # curl waits for `100 Continue` before a large body, and hears 413 instead.
    started = time.monotonic()
    out = subprocess.run([shutil.which("curl"), "-sS", "-w", "\n%{http_code}", f"{api.base_url}/embeddings",
                          "-H", f"Authorization: Bearer {TOKEN}", "-H", "Expect: 100-continue",
                          "--expect100-timeout", "30", "--data-binary", "@-"],
                         input=big, capture_output=True, timeout=60)
    assert out.stdout.decode().rsplit("\n", 1)[1] == "413" and time.monotonic() - started < 20
    still_works(api)


def test_too_much_pending_work_gets_429(live, model):
    tiny = live["tiny"]
    status, headers, body = tiny.embed({"input": fresh(2, "pending")}, token=None)
    assert_error(status, body, 429, "resource_exhausted")
    assert body["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        tiny.openai(token="unused").embeddings.create(model=model["id"], input=fresh(3, "pending"))
    still_works(tiny, token=None)  # one new text is within the bound


def test_an_unready_frontend_answers_503_and_its_probes_say_why(live):
    starting = live["starting"]
    status, headers, body = starting.embed({"input": ["x"]}, token=None)
    assert_error(status, body, 503, "unavailable")
    assert "starting" in body["error"]["message"] and headers["retry-after"] == "1"
    status, _, raw = starting.request("GET", "/v1/models", token=None)
    assert_error(status, json.loads(raw), 503, "unavailable")
    # Readiness as gRPC health's "" name, liveness as its `liveness` name.
    assert starting.request("GET", "/ready", token=None)[0] == 503
    assert starting.request("GET", "/health", token=None)[0] == 200


def test_a_timeout_header_is_the_deadline(live, api):
    replica = live["replica"]
    status, _, body = api.embed({"input": fresh(1)}, headers={"x-request-timeout": "30"})
    assert status == 200, body
    replica.signal(signal.SIGSTOP)  # a hung replica: nothing new is computed
    try:
        started = time.monotonic()
        status, _, body = api.embed({"input": fresh(2, "hung")}, headers={"x-request-timeout": "0.5"})
        assert_error(status, body, 504, "deadline_exceeded")
        assert body["error"]["type"] == "timeout_error" and time.monotonic() - started < 10
        # A cached text needs no replica, and the openai client's own timeout header is honoured.
        cached = fresh(1, "cached")
        replica.signal(signal.SIGCONT)
        assert api.embed({"input": cached})[0] == 200
        replica.signal(signal.SIGSTOP)
        status, _, body = api.embed({"input": cached}, headers={"x-stainless-read-timeout": "0.5"})
        assert status == 200, body
        status, _, body = api.embed({"input": fresh(1)}, headers={"x-stainless-read-timeout": "0.5"})
        assert_error(status, body, 504, "deadline_exceeded")
    finally:
        replica.signal(signal.SIGCONT)
    for bad in ("0", "-1", "soon", "nan", "inf"):
        status, _, body = api.embed({"input": "x"}, headers={"x-request-timeout": bad})
        assert_error(status, body, 400, "invalid_timeout")
    still_works(api)


def test_impatient_http_clients_leave_nothing_pending(api):
    """Callers that hang up at random moments (mid-headers, mid-body, while their texts compute)
    and callers with a 1 ms deadline: afterwards every in-flight gauge is back at idle (nothing
    pending, queued, or leaked), the log has no traceback, and a new request is computed."""
    rng = random.Random(7)

    def hang_up() -> None:
        body = json.dumps({"input": fresh(rng.randrange(1, 9), "impatient")}).encode()
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        raw = head + body
        with socket.create_connection(("127.0.0.1", api.http_port), timeout=5) as sock:
            sock.sendall(raw[:rng.randrange(1, len(raw) + 1)])
            time.sleep(rng.uniform(0, 0.03))

    def one_ms() -> int:
        return api.embed({"input": fresh(2, "1ms")}, headers={"x-request-timeout": "0.001"})[0]

    with ThreadPoolExecutor(16) as pool:
        hung = [pool.submit(hang_up) for _ in range(80)]
        rushed = [pool.submit(one_ms) for _ in range(30)]
        for f in hung:
            f.result()
        assert {f.result() for f in rushed} <= {200, 504}
    url = f"http://127.0.0.1:{api.admin_port}/metrics"

    def idle() -> bool:
        sample = {name: value for name, _labels, value in fetch(url, token=TOKEN).samples}
        return gauge_view(sample, free_slots=8)[1]

    wait_until(idle, 30, "every in-flight gauge back at idle")
    assert "Traceback" not in api.proc.log()
    still_works(api)


def test_unknown_paths_and_methods_get_404_and_405(api):
    status, _, raw = api.request("GET", "/v1/nothing")
    assert_error(status, json.loads(raw), 404, "not_found")
    status, headers, raw = api.request("GET", "/v1/embeddings")
    assert_error(status, json.loads(raw), 405, "method_not_allowed")
    assert headers["allow"] == "POST"


def test_request_ids_are_echoed_or_made(api):
    status, headers, _ = api.embed({"input": "x"}, headers={"x-request-id": "my-id.1"})
    assert status == 200 and headers["x-request-id"] == "my-id.1"
    status, headers, _ = api.embed({"input": []}, headers={"x-request-id": "bad id with spaces"})
    assert status == 400 and len(headers["x-request-id"]) == 32  # not acceptable: a new one
    assert f"request_id={headers['x-request-id']} POST /v1/embeddings failed: INVALID_ARGUMENT" in api.proc.log()


# --- fuzz: whatever the body, a 2xx or a 4xx, never a 5xx -----------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
fields = st.fixed_dictionaries({}, optional={
    "input": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=4), json_values),
    "dimensions": st.one_of(st.integers(-5, 500), st.sampled_from([32, 64, 384]), json_values),
    "encoding_format": st.one_of(st.sampled_from(["float", "base64", ""]), json_values),
    "model": json_values, "user": json_values})
plausible = st.fixed_dictionaries(
    {"input": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=30), min_size=1, max_size=4))},
    optional={"dimensions": st.one_of(st.sampled_from([32, 64, 256, 384]), st.integers(-5, 500)),
              "encoding_format": st.sampled_from(["float", "base64"]), "model": st.text(max_size=10),
              "user": st.text(max_size=10), "extra": json_values})
bodies = st.one_of(plausible.map(lambda d: json.dumps(d).encode()), fields.map(lambda d: json.dumps(d).encode()),
                   json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))


@FUZZ
@given(body=bodies)
def test_fuzzed_bodies_get_2xx_or_4xx(api, body):
    status, _, raw = api.request("POST", "/v1/embeddings", body)
    event(f"HTTP {status}")  # --hypothesis-show-statistics: how many were valid
    assert 200 <= status < 300 or 400 <= status < 500, (status, raw[:500])
    answer = json.loads(raw)
    assert ("data" in answer) if status == 200 else set(answer["error"]) == {"message", "type", "param", "code"}


def test_after_the_storms_the_frontend_still_serves(api):
    still_works(api)
    assert "Traceback" not in api.proc.log()


def test_a_missing_tokenizer_stops_the_frontend_before_it_serves(tmp_path):
    out = subprocess.run([sys.executable, "-m", "embedding", "--port", str(free_port()), "--admin-port", "0",
                          "--http-port", str(free_port()), "--tokenizer", str(tmp_path), "--mlbase",
                          f"127.0.0.1:{free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no usable tokenizer.json" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
