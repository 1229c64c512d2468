"""The Ray Serve application of one pool: an OpenAI-compatible API over one Engine per replica.

    import_path: deltafleet.serving.app:build_app      args: see serving/config.py (AppArgs)

The tenant travels in the request body (`model`), never as Serve's multiplexed model id
(batching by that id would split the cross-tenant batches this engine exists for).
`reconfigure(user_config)` diffs the tenant set; Serve calls it on every config update
without restarting the replica. The engine's decode loop runs in its own thread.
"""

# No `from __future__ import annotations`: serve.ingress (Ray 2.60) rebuilds the routes
# where string annotations no longer resolve, and FastAPI then reads the request models as
# query parameters ("query: Field required").
import asyncio
import hmac
import json
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import (
    BASE_ALIASES, DEPLOYMENT, TENANT_STATUS_ROUTE, AppArgs, ConfigError, TenantLoadState, TenantStatesReport, key_digest,
    parse_args, parse_tenants, resolve_uri,
)
from .engine import BASE_TENANT, BadRequest, Engine, EngineError, Event, UnknownTenant
from .openai_api import (
    ChatRequest, CompletionRequest, chat_body, chat_prompt, completion_body, error_body, models_body, new_id, usage,
    usage_chunk,
)

api = FastAPI(title="deltafleet pool")


DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # AppArgs.max_request_bytes; set per replica in api.state


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, exc: RequestValidationError):
    err = exc.errors()[0]
    if err["type"] == "json_invalid":  # its loc is a byte offset, not a field
        return JSONResponse(error_body(f"request body is not valid JSON: {err['msg']}", "invalid_request_error", 400),
                            status_code=400)
    loc = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "unsupported":  # a model-level refusal names its field itself
        return JSONResponse(error_body(msg, "invalid_request_error", 400, err["ctx"]["field"]), status_code=400)
    return JSONResponse(error_body(f"{loc}: {msg}" if loc else msg, "invalid_request_error", 400, loc or None), status_code=400)


def _param(loc: tuple) -> str:
    """A validation error's location as OpenAI names a param: ("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for p in loc:
        if p != "body":
            out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """404, 405, undecodable bodies, ...: OpenAI's error shape, never FastAPI's {"detail": ...}."""
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), type_, exc.status_code), status_code=exc.status_code)


class BodyLimit:
    """Refuse request bodies over api.state.max_request_bytes with a 413, counting the bytes as
    they arrive (a Content-Length is not trusted, and chunked bodies have none)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(api.state, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(send, limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send, limit)


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = json.dumps(error_body(f"request body is larger than {limit} bytes", "invalid_request_error", 413)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


api.add_middleware(BodyLimit)


# Helpers sit above the class: serve.ingress pickles the routes at decoration time.
def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Unauthorized(EngineError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


def _error(e: EngineError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None  # overloaded, or a tenant/replica not ready
    return JSONResponse(error_body(str(e), e.type, getattr(e, "code", e.status)), status_code=e.status, headers=headers)


def _no_such_route() -> JSONResponse:
    """Exactly what an unknown route answers (_http_error of Starlette's 404): a route the caller
    may not read must not be told apart from one that does not exist."""
    return JSONResponse(error_body("Not Found", "not_found_error", 404), status_code=404)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 -- outside a replica (unit use): the process is the replica
        return f"pid-{os.getpid()}"


def _authorization(request: Request) -> str:
    """The request's one Authorization header ("" when none). Two are refused: which key the
    caller meant is ambiguous, and a proxy that adds one must not decide whose key counts."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise Unauthorized(f"{len(values)} Authorization headers: send exactly one")
    return values[0] if values else ""


async def submitted(submit):
    """`submit(abandoned)` (tokenize + queue, on a worker thread) awaited so that a client who
    leaves meanwhile never gets its request run: the thread cannot be stopped, so the engine
    checks `abandoned()` after tokenizing, before queueing."""
    gone = threading.Event()
    fut = asyncio.ensure_future(asyncio.to_thread(submit, gone.is_set))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        gone.set()
        fut.add_done_callback(lambda f: f.result().cancel() if not f.cancelled() and f.exception() is None else None)
        raise


# Serve's own per-replica limit, when the serve config sets none: above what the engine runs
# and queues at its defaults (a batch + max_queue, and a batch of slack), so that the engine's
# OpenAI-shaped 429 comes first, never Serve's own rejection.
MAX_ONGOING_REQUESTS = 2 * AppArgs.model_fields["max_batch_size"].default + AppArgs.model_fields["max_queue"].default


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10)
@serve.ingress(api)
class DeltaServer:
    def __init__(self, args: dict) -> None:
        self.args = parse_args(args)
        a = self.args
        api.state.max_request_bytes = a.max_request_bytes
        from .metrics import PoolMetrics

        self.metrics = PoolMetrics(a.pool)
        self.engine = Engine.from_args(a, on_step=self.metrics.step)
        self.base_names = (a.pool, *BASE_ALIASES)
        self.uris: dict[str, str] = {}
        self.key_tenants: dict[str, frozenset[str]] = {}  # key digest -> the tenants it may call
        self.status_key_sha256: str | None = None  # who may read the tenant states (auth: keys)

    def reconfigure(self, user_config: dict) -> None:
        """Apply a new tenant set: load new ones in the background, unload removed ones."""
        cfg = parse_tenants(user_config, pool=self.args.pool)
        paths = {name: resolve_uri(spec.uri, self.args.store_root) for name, spec in cfg.tenants.items()}
        self.engine.set_tenants(paths)
        self.uris = {name: spec.uri for name, spec in cfg.tenants.items()}
        keys: dict[str, set[str]] = {}
        for name, spec in cfg.tenants.items():
            for digest in spec.key_sha256:
                keys.setdefault(digest, set()).add(name)
        self.key_tenants = {d: frozenset(names) for d, names in keys.items()}  # swapped whole: requests see old or new
        self.status_key_sha256 = cfg.status_key_sha256

    def _caller(self, request: Request) -> frozenset[str] | None:
        """The tenants this request's API key may call; None when the pool needs no keys.
        Raises Unauthorized (401) for a missing or unknown key."""
        if self.args.auth == "none":
            return None
        scheme, _, key = _authorization(request).partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("no API key: send `Authorization: Bearer <key>`")
        allowed = self.key_tenants.get(key_digest(key.strip()))
        if allowed is None:
            raise Unauthorized("invalid API key")
        return allowed

    def _may_read_states(self, request: Request) -> bool:
        """Open without auth; with auth: keys only the pool status key (never a tenant's key)."""
        if self.args.auth == "none":
            return True
        try:
            scheme, _, key = _authorization(request).partition(" ")
        except Unauthorized:
            return False
        want = self.status_key_sha256
        return bool(want) and scheme.lower() == "bearer" and bool(key.strip()) and hmac.compare_digest(key_digest(key.strip()), want)

    def _may_call(self, allowed: frozenset[str] | None, model: str) -> bool:
        return allowed is None or model in self.base_names or model in allowed

    def check_health(self) -> None:
        """Ray replaces a replica whose health check raises."""
        problem = self.engine.problem()  # a dead thread, an unexpected loop error, a sticky device error
        if problem:
            raise RuntimeError(problem)
        self.metrics.bank(self.engine.bank.stats())

    # ---- API ---------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            allowed = self._caller(request)
        except Unauthorized as e:
            return _error(e)
        names = [(n, "deltafleet-base") for n in self.base_names]
        names += [(n, n.split("/")[0] if "/" in n else "deltafleet") for n in self.engine.bank.names() if self._may_call(allowed, n)]
        return models_body(names)

    @api.get("/debug/replica")
    async def replica(self):
        """Process id (tests check it survives reconfigure), tenant states and engine figures.
        Only on pools without API keys: it names every tenant."""
        if self.args.auth != "none":
            return _no_such_route()
        return {"pid": os.getpid(), "pool": self.args.pool, "uris": self.uris, **self.engine.stats()}

    @api.get(TENANT_STATUS_ROUTE)
    async def tenant_states(self, request: Request):
        """Each tenant's load state on this replica as a TenantStatesReport (the operator's Served
        condition reads it): {"replica": id, "tenants": {name: {"state": loading|ready|failed, "error": str|None}}}.
        With auth: keys only the pool status key reads it; any other caller gets an unknown route's 404."""
        if not self._may_read_states(request):
            return _no_such_route()
        bank = self.engine.bank
        held = {name: t for name in bank.names() if (t := bank.status(name)) is not None}
        tenants = {name: TenantLoadState(state=t.status, error=t.error) for name, t in held.items()}
        return TenantStatesReport(replica=_replica_id(), tenants=tenants).model_dump(mode="json")

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(body, body.prompt, completion_body, "cmpl", request, default_max_tokens=16)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        # OpenAI's chat default: generate until the model stops or the context is full
        return await self._serve(body, lambda: chat_prompt(self.engine.tokenizer, body.messages), chat_body, "chatcmpl", request,
                                 default_max_tokens=None)

    # ---- one request --------------------------------------------------------------------
    async def _serve(self, body, prompt, shape, prefix: str, request: Request, default_max_tokens: int | None):
        """prompt: text, token ids, or a function making them (a chat template): tokenizing runs
        in a worker thread, so a huge prompt never stalls the event loop other tenants share."""
        t0 = time.monotonic()
        try:
            allowed = self._caller(request)
        except Unauthorized as e:
            self._record("<unauthorized>", e.type, 0, 0, t0, None)
            return _error(e)
        if not self._may_call(allowed, body.model):  # the same answer as a model that does not exist
            self._record("<unknown>", UnknownTenant.type, 0, 0, t0, None)
            return _error(UnknownTenant(f"model {body.model!r} is not served by this pool"))
        tenant = BASE_TENANT if body.model in self.base_names else body.model
        loop = asyncio.get_running_loop()

        def submit(abandoned):
            return self.engine.submit(tenant, prompt() if callable(prompt) else prompt, body.sampling(default_max_tokens),
                                      loop=loop, abandoned=abandoned)

        try:
            stream = await submitted(submit)
        except EngineError as e:  # unknown names are not recorded as a tag (unbounded cardinality)
            self._record("<unknown>" if e.status == 404 else body.model, e.type, 0, 0, t0, None)
            return _error(e)
        events = stream.__aiter__()
        try:
            first = await events.__anext__()  # errors before the first token get a proper HTTP status
        except BaseException:  # the client left (the handler is cancelled): stop the work too
            stream.cancel()
            raise
        ttft = time.monotonic() - t0
        if first.error:
            self._record(body.model, first.error.type, 0, 0, t0, None)
            return _error(first.error)
        rid = new_id(prefix)
        if not body.stream:
            text, last = [first.text], first
            try:
                async for ev in events:
                    if ev.error:  # failed mid-generation: counted as that error, not lost from the metrics
                        self._record(body.model, ev.error.type, last.prompt_tokens, last.completion_tokens, t0, ttft)
                        return _error(ev.error)
                    text.append(ev.text)
                    last = ev
            finally:
                stream.cancel()  # a no-op when finished; frees the row when the client went away
            self._record(body.model, "ok", last.prompt_tokens, last.completion_tokens, t0, ttft)
            return shape(rid, body.model, "".join(text), last.finish_reason, usage(last.prompt_tokens, last.completion_tokens))
        return StreamingResponse(self._sse(stream, events, first, rid, body, shape, t0, ttft), media_type="text/event-stream")

    async def _sse(self, stream, events, first: Event, rid, body, shape, t0, ttft):
        chat, last = shape is chat_body, first
        try:
            kw = {"first": True} if chat else {}
            yield _data(shape(rid, body.model, first.text, first.finish_reason, None, chunk=True, **kw))
            async for ev in events:
                if ev.error:  # the stream ends with the error event: no [DONE], not counted as ok
                    yield _data(error_body(str(ev.error), ev.error.type, ev.error.status))
                    self._record(body.model, ev.error.type, last.prompt_tokens, last.completion_tokens, t0, ttft)
                    return
                last = ev
                yield _data(shape(rid, body.model, ev.text, ev.finish_reason, None, chunk=True))
            if body.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _data(usage_chunk(rid, body.model, obj, usage(last.prompt_tokens, last.completion_tokens)))
            yield "data: [DONE]\n\n"
            self._record(body.model, "ok", last.prompt_tokens, last.completion_tokens, t0, ttft)
        finally:
            stream.cancel()  # client disconnected mid-stream: the engine drops the row next step

    def _record(self, model: str, outcome: str, prompt: int, completion: int, t0: float, ttft: float | None) -> None:
        self.metrics.request(model, outcome, prompt, completion, time.monotonic() - t0, ttft)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def build_app(args: dict) -> serve.Application:
    """Ray Serve `import_path` entry: validate args here so a bad config fails at deploy time."""
    try:
        parse_args(dict(args))
    except ConfigError as e:
        raise ValueError(f"deltafleet pool args: {e}") from None
    return DeltaServer.bind(dict(args))


__all__ = ["DeltaServer", "build_app", "BadRequest", "ConfigError"]
