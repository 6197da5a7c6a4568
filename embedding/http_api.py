"""The OpenAI-compatible HTTP API: `POST /v1/embeddings`, `GET /v1/models`,
`GET /v1/models/{id}`, and `GET /health` (liveness) and `GET /ready` (readiness),
which answer as the gRPC health service's `liveness` and "" names do.

A second transport for the engine the gRPC servicer calls, and as thin: check the
token with the same Gate, parse the JSON body, call `FrontendEngine.embed` on the
same event loop, write the JSON answer. Nothing here knows about caches or replicas.

The request is OpenAI's: `input` (a string or a list of strings; token arrays are
refused), `model` (a name of one of the frontend's `--extra-model` models picks it; any
other name, as OpenAI clients send their own, means the default model; the answer names
the model used), `dimensions` (the Matryoshka width; absent = the tenant's default),
`encoding_format` (`float`, the default, or `base64`: each vector's little-endian
float32 bytes, which the official Python client asks for), `user` (ignored). Texts
over the model window are cut to it, as gRPC's default truncation does.

The answer is OpenAI's: `{"object": "list", "data": [{"object": "embedding", "index",
"embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}`, the counts being
the tokens the model reads for each input (embedding/token_counts.py). The cache
figures gRPC puts in `usage` come as headers: x-sutra-l1-hits, x-sutra-l2-hits,
x-sutra-computed, x-sutra-duplicates, x-sutra-truncated; and x-request-id, as on gRPC.

Deadline: `x-request-timeout: SECONDS` (a decimal number) makes the request's deadline,
as grpc-timeout does on gRPC; without it, the official client's own
`x-stainless-read-timeout` does (it stops waiting then anyway).

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`. A domain
error (common/errors.py) has the HTTP status of its gRPC code (400 invalid input, 401
no or a wrong token, 429 overloaded, 503 unavailable, 504 deadline) and that code's
name, lower case, as `code`; what the HTTP layer refuses itself: 413 for a body over
the frontend's --max-message-bytes (by Content-Length before the body is read, and
while reading a chunked one), 408 for a body not received in time, 404 and 405.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import time
from collections.abc import Callable, Mapping

import numpy as np
import orjson
from aiohttp import web

from common import tracing
from common.errors import INTERNAL_MESSAGE, DeadlineExceeded, SutraError, Unauthenticated, Unavailable, http_status
from embedding.engine import EmbedReply, FrontendEngine, ModelConfig
from embedding.http_server import READ_TIMEOUT_S, bearer_challenge, gate_metadata
from embedding.request_ids import CALLER_FAULTS, HEADER as REQUEST_ID, log_failure, request_id
from embedding.stats import HTTP_EMBEDDINGS
from embedding.tenants import Gate
from embedding.token_counts import TokenCounter

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
CLIENT_TIMEOUT_HEADER = "x-stainless-read-timeout"  # what the official OpenAI clients send
REALM = "sutra"
RETRY_AFTER_S = 1  # told to callers refused with 429 or 503
# OpenAI's error `type` for each status we answer with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 409: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "timeout_error"}
# The engine names request fields as gRPC does; the parameter that carries each over HTTP.
_PARAMS = {"inputs": "input", "dimensions": "dimensions"}
_FIELD = re.compile(r"`(\w+)")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ApiError(Exception):
    """A refusal of the HTTP layer's own: the body or a header is wrong before the engine sees it."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                                    "param": param, "code": code}}, status, headers)


def _oversized(request: web.BaseRequest, limit: int) -> ApiError | None:
    """413 for a body whose Content-Length is over `limit`, before a byte of it is read."""
    if request.content_length is not None and request.content_length > limit:
        return ApiError(413, f"the body is {request.content_length} bytes; the limit is {limit} "
                             "(the frontend's --max-message-bytes)", "request_too_large")
    return None


def _domain_error(exc: SutraError, request: web.Request) -> web.Response:
    """A domain error as the gRPC port would refuse it, in OpenAI's shape."""
    status = http_status(exc)
    message = str(exc)
    field = _FIELD.match(message)
    param = _PARAMS.get(field.group(1)) if field else None
    if param == "input":
        message = message.replace("`inputs", "`input", 1)
    headers = (bearer_challenge(request, REALM) if isinstance(exc, Unauthenticated)
               else {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None)
    return error_response(status, message, exc.code.name.lower(), param, headers)


def _deadline(request: web.Request) -> float | None:
    """Absolute time.monotonic() from the caller's timeout header; None without one. A wrong
    x-request-timeout is the caller's error; a wrong client header is ignored."""
    for name in (TIMEOUT_HEADER, CLIENT_TIMEOUT_HEADER):
        value = request.headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds) and seconds > 0:
            return time.monotonic() + seconds
        if name == TIMEOUT_HEADER:
            raise ApiError(400, f"`{TIMEOUT_HEADER}` must be a number of seconds above 0", "invalid_timeout")
    return None


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    if isinstance(value, list) and value and all(isinstance(t, (int, list)) for t in value):
        raise ApiError(400, "token arrays are not supported: send `input` as text", "invalid_input", "input")
    raise ApiError(400, "`input` must be a string or a list of strings", "invalid_input", "input")


def parse_request(raw: bytes) -> tuple[list[str], int, bool, str]:
    """(texts, dimensions (0 = default), base64?) from an embeddings request body; ApiError when
    it is not one."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    if "input" not in doc:
        raise ApiError(400, "`input` is required", "invalid_input", "input")
    texts = _texts(doc["input"])
    dimensions = doc.get("dimensions")
    if dimensions is None:
        dimensions = 0
    elif isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise ApiError(400, "`dimensions` must be a positive integer", "invalid_dimensions", "dimensions")
    encoding = doc.get("encoding_format")
    if encoding is None:
        encoding = "float"
    elif encoding not in ("float", "base64"):
        raise ApiError(400, "`encoding_format` must be `float` or `base64`", "invalid_encoding_format",
                       "encoding_format")
    for name in ("model", "user"):
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise ApiError(400, f"`{name}` must be a string", "invalid_request", name)
    return texts, dimensions, encoding == "base64", doc.get("model") or ""


def embeddings_body(reply: EmbedReply, tokens: int, as_base64: bool) -> bytes:
    """The answer's JSON: vectors as float32 numbers (orjson writes each float32 in the fewest digits
    that read back to the same float32) or as base64 of their little-endian bytes."""
    vectors = np.ascontiguousarray(reply.vectors, dtype="<f4")
    if as_base64:
        rows = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        rows = list(vectors)
    doc = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in
                                      enumerate(rows)],
           "model": reply.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def usage_headers(reply: EmbedReply) -> dict[str, str]:
    u = reply.usage
    return {"x-sutra-l1-hits": str(u.l1_hits), "x-sutra-l2-hits": str(u.l2_hits), "x-sutra-computed": str(u.computed),
            "x-sutra-duplicates": str(u.duplicates), "x-sutra-truncated": str(u.truncated)}


def api_app(engine: FrontendEngine, gate: Gate, counter: TokenCounter, *, ready: Callable[[], bool],
            live: Callable[[], bool], max_body_bytes: int, read_timeout_s: float = READ_TIMEOUT_S,
            extra: Mapping[str, FrontendEngine] | None = None) -> web.Application:
    """The API's routes over `engine`; `ready` and `live` are the gRPC server's readiness and liveness.
    `extra`: the frontend's other models by name (--extra-model); a request whose `model` names one is
    embedded by it, any other `model` by the default (OpenAI clients send names of their own)."""
    extra = dict(extra or {})
    created = int(time.time())

    @web.middleware
    async def calls(request: web.Request, handler) -> web.StreamResponse:
        """Every call: its request id, its server span, and whatever it raises as an OpenAI error."""
        rid = request_id([(REQUEST_ID, request.headers.get(REQUEST_ID, ""))])
        route = request.match_info.route.resource
        name = f"{request.method} {route.canonical if route is not None else repr(request.path[:100])}"
        with tracing.incoming(name, request.headers, attributes={"http.request.method": request.method,
                                                                  "url.path": request.path}) as span:
            tracing.annotate("sutra.request_id", rid)
            log.debug("request_id=%s %s started", rid, name)
            try:
                response = await handler(request)
            except SutraError as exc:
                response = _domain_error(exc, request)
                log_failure(rid, name, exc.code.name, exc.code in CALLER_FAULTS, exc)
            except ApiError as exc:
                response = error_response(exc.status, str(exc), exc.code, exc.param)
                log_failure(rid, name, f"HTTP {exc.status}", True, exc)
            except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, a body too large
                allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
                response = error_response(exc.status, exc.text or exc.reason,
                                          _HTTP_CODES.get(exc.status, "http_error"), headers=allow)
                log_failure(rid, name, f"HTTP {exc.status}", True, exc.reason)
            except Exception:  # noqa: BLE001 - a bug of ours: logged with its traceback, a fixed message out
                log.exception("request_id=%s %s failed", rid, name)
                response = error_response(500, INTERNAL_MESSAGE, "internal")
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                tracing.set_error(span, f"HTTP {response.status}")
        response.headers[REQUEST_ID] = rid
        return response

    def model_config() -> ModelConfig:
        if engine.model is None:
            raise Unavailable("the frontend is starting: ML-base has not described its model yet")
        return engine.model

    async def read_body(request: web.Request) -> bytes:
        if (refusal := _oversized(request, max_body_bytes)) is not None:
            raise refusal
        try:
            async with asyncio.timeout(read_timeout_s):
                return await request.read()  # aiohttp stops at client_max_size: 413
        except TimeoutError:
            raise ApiError(408, f"the request body was not received within {read_timeout_s:g} s",
                           "request_timeout") from None

    async def embeddings(request: web.Request) -> web.Response:
        tenant = gate.tenant(gate_metadata(request))
        deadline = _deadline(request)
        texts, dimensions, as_base64, model = parse_request(await read_body(request))
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"`{TIMEOUT_HEADER}` passed before the request was read")
        started = time.perf_counter()
        reply = await extra.get(model, engine).embed(texts, dimensions, deadline=deadline, tenant=tenant)
        tokens = sum(await counter.count(texts))
        response = web.Response(body=embeddings_body(reply, tokens, as_base64), content_type="application/json",
                                headers=usage_headers(reply))
        engine.stats.request_latency[HTTP_EMBEDDINGS].record(time.perf_counter() - started)
        return response

    async def too_large_first(request: web.Request) -> web.StreamResponse | None:
        """A client that waits for `100 Continue` before sending the body (curl does for large ones)
        hears 413 instead when Content-Length is over the limit, and sends nothing."""
        if (refusal := _oversized(request, max_body_bytes)) is not None:
            return error_response(refusal.status, str(refusal), refusal.code, headers={"Connection": "close"})
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the status line of the real answer is still to come
        return None

    def model_object(m: ModelConfig, tenant: str) -> dict:
        policy, info = m.policy_for(tenant), m.info
        # OpenAI's fields, then what a caller of this API may want to know about widths.
        return {"id": info.model_id, "object": "model", "created": created, "owned_by": "sutra",
                "native_width": info.native_width, "default_width": policy.default_width,
                "min_width": policy.min_width, "max_seq_length": info.max_seq_length, "fingerprint": info.fingerprint}

    def served() -> dict[str, ModelConfig]:
        """Every model by the name a request uses: the default's id, then --extra-model names."""
        found = {model_config().info.model_id: model_config()}
        found.update({name: e.model for name, e in extra.items() if e.model is not None})
        return found

    async def models(request: web.Request) -> web.Response:
        tenant = gate.tenant(gate_metadata(request))
        return json_response({"object": "list", "data": [{**model_object(m, tenant), "id": name}
                                                         for name, m in served().items()]})

    async def one_model(request: web.Request) -> web.Response:
        tenant = gate.tenant(gate_metadata(request))
        wanted, known = request.match_info["model"], served()
        if wanted not in known:
            raise ApiError(404, f"no model {wanted!r}: this frontend serves {', '.join(map(repr, known))}",
                           "model_not_found", "model")
        return json_response({**model_object(known[wanted], tenant), "id": wanted})

    def probe(check: Callable[[], bool]):
        async def answer(_request: web.Request) -> web.Response:
            ok = check()
            return json_response({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)
        return answer

    app = web.Application(middlewares=[calls], client_max_size=max_body_bytes)
    app.router.add_post("/v1/embeddings", embeddings, expect_handler=too_large_first)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", one_model)
    app.router.add_get("/health", probe(live))
    app.router.add_get("/ready", probe(ready))
    return app
