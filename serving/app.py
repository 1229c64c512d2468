"""The Ray Serve application of one pool: the Ingress (an OpenAI-compatible API) over the
DeltaServer engine replicas (serving/replica.py) and the TenantDirectory (serving/directory.py).

    import_path: deltafleet.serving.app:build_app      args: see serving/config.py (AppArgs)

The ingress checks the key and the body, then calls an engine replica through a handle with
`multiplexed_model_id` = the tenant (placement: routed), so Serve routes it to a replica that
holds the tenant; the engine's Events stream back through the handle. Serve's multiplexing
only routes: an engine replica still batches every tenant it holds in one step (it uses no
`@serve.batch`, which would split batches by that id). `reconfigure(user_config)` gives each
deployment the new tenant set without restarting a replica.
"""

# No `from __future__ import annotations`: serve.ingress (Ray 2.60) rebuilds the routes
# where string annotations no longer resolve, and FastAPI then reads the request models as
# query parameters ("query: Field required").
import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import (
    BASE_ALIASES, INGRESS, INGRESS_MAX_ONGOING, TENANT_STATUS_ROUTE, ConfigError, key_digest, parse_args, parse_tenants,
)
from .directory import TenantDirectory
from .engine import BASE_TENANT, BadRequest, EngineError, EngineStopped, Event, Overloaded, UnknownTenant
from .openai_api import (
    ChatRequest, CompletionRequest, chat_body, completion_body, error_body, models_body, new_id, usage, usage_chunk,
)
from .replica import DeltaServer, replica_id

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


def _authorization(request: Request) -> str:
    """The request's one Authorization header ("" when none). Two are refused: which key the
    caller meant is ambiguous, and a proxy that adds one must not decide whose key counts."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise Unauthorized(f"{len(values)} Authorization headers: send exactly one")
    return values[0] if values else ""


class EngineUnreachable(EngineError):
    """No engine replica answered the handle call (one died mid-request, Serve's queue is full)."""

    status, type = 503, "engine_unavailable"


async def _next(stream) -> Event | None:
    """The next Event of an engine call (None at its end); a call that fails in Ray (a replica
    gone, Serve's queue full) is an Event with a 503 error, so the client gets OpenAI's shape."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except asyncio.CancelledError:
        raise
    except BackPressureError:  # every engine replica full and Serve's queue for them too
        return Event("", [], error=Overloaded("the pool is at capacity (every replica and the queue in front of them "
                                              "are full); retry later"))
    except Exception as e:  # noqa: BLE001 -- RayActorError, a replica gone, ...: said, never a bare 500
        return Event("", [], error=EngineUnreachable(f"no engine replica could serve this request: {type(e).__name__}: {e}"[:500]))


@serve.deployment(name=INGRESS, max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict, engine, directory) -> None:
        self.args = parse_args(args)
        a = self.args
        api.state.max_request_bytes = a.max_request_bytes
        from .metrics import PoolMetrics

        self.metrics = PoolMetrics(a.pool)
        self.engine, self.directory = engine, directory  # handles: the DeltaServer and TenantDirectory deployments
        self.base_names = (a.pool, *BASE_ALIASES)
        self.tenants: frozenset[str] = frozenset()
        self.key_tenants: dict[str, frozenset[str]] = {}  # key digest -> the tenants it may call
        self.status_key_sha256: str | None = None  # who may read the tenant states (auth: keys)

    def reconfigure(self, user_config: dict) -> None:
        """The pool's tenant set and who may call each (the engine replicas load the deltas)."""
        cfg = parse_tenants(user_config, pool=self.args.pool)
        keys: dict[str, set[str]] = {}
        for name, spec in cfg.tenants.items():
            for digest in spec.key_sha256:
                keys.setdefault(digest, set()).add(name)
        self.tenants = frozenset(cfg.tenants)
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
        if model in self.base_names:
            return True
        return model in self.tenants and (allowed is None or model in allowed)

    # ---- API ---------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            allowed = self._caller(request)
        except Unauthorized as e:
            return _error(e)
        names = [(n, "deltafleet-base") for n in self.base_names]
        names += [(n, n.split("/")[0] if "/" in n else "deltafleet") for n in sorted(self.tenants) if self._may_call(allowed, n)]
        return models_body(names)

    @api.get("/debug/replica")
    async def replica(self):
        """One engine replica's process id (tests check it survives reconfigure), tenants and
        figures. Only on pools without API keys: it names every tenant."""
        if self.args.auth != "none":
            return _no_such_route()
        return await self.engine.debug.remote()

    @api.get(TENANT_STATUS_ROUTE)
    async def tenant_states(self, request: Request):
        """Every tenant's state in the pool as a TenantStatesReport (the operator's Served
        condition reads it): {"replica", "replicas", "tenants": {name: {"state", "error", "replicas"}}}.
        With auth: keys only the pool status key reads it; any other caller gets an unknown route's 404."""
        if not self._may_read_states(request):
            return _no_such_route()
        return await self.directory.states.remote(replica_id())

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(body, completion_body, "cmpl", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        return await self._serve(body, chat_body, "chatcmpl", request)

    # ---- one request --------------------------------------------------------------------
    def _call(self, tenant: str | None, body):
        """The engine call: routed to a replica holding the tenant (placement: routed)."""
        options = {"stream": True}
        if tenant is not BASE_TENANT and self.args.placement == "routed":
            options["multiplexed_model_id"] = tenant
        return self.engine.options(**options).generate.remote(tenant, body)

    async def _serve(self, body, shape, prefix: str, request: Request):
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
        stream = self._call(tenant, body)
        try:
            first = await _next(stream)  # errors before the first token get a proper HTTP status
        except BaseException:  # the client left (the handler is cancelled): stop the work too
            stream.cancel()
            raise
        ttft = time.monotonic() - t0
        if first is None or first.error:
            error = first.error if first is not None else EngineUnreachable("the engine replica ended the request without an answer")
            self._record("<unknown>" if error.status == 404 else body.model, error.type, 0, 0, t0, None)
            return _error(error)
        rid = new_id(prefix)
        if not body.stream:
            text, last = [first.text], first
            try:
                while (ev := await _next(stream)) is not None:
                    if ev.error:  # failed mid-generation: counted as that error, not lost from the metrics
                        self._record(body.model, ev.error.type, last.prompt_tokens, last.completion_tokens, t0, ttft)
                        return _error(ev.error)
                    text.append(ev.text)
                    last = ev
            finally:
                stream.cancel()  # a no-op when finished; frees the row when the client went away
            self._record(body.model, "ok", last.prompt_tokens, last.completion_tokens, t0, ttft)
            return shape(rid, body.model, "".join(text), last.finish_reason, usage(last.prompt_tokens, last.completion_tokens))
        return StreamingResponse(self._sse(stream, first, rid, body, shape, t0, ttft), media_type="text/event-stream")

    async def _sse(self, stream, first: Event, rid, body, shape, t0, ttft):
        chat, last = shape is chat_body, first
        try:
            kw = {"first": True} if chat else {}
            yield _data(shape(rid, body.model, first.text, first.finish_reason, None, chunk=True, **kw))
            while (ev := await _next(stream)) is not None:
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
            stream.cancel()  # client disconnected mid-stream: the engine replica drops the row next step

    def _record(self, model: str, outcome: str, prompt: int, completion: int, t0: float, ttft: float | None) -> None:
        self.metrics.request(model, outcome, prompt, completion, time.monotonic() - t0, ttft)


def build_app(args: dict) -> serve.Application:
    """Ray Serve `import_path` entry: validate args here so a bad config fails at deploy time."""
    try:
        parse_args(dict(args))
    except ConfigError as e:
        raise ValueError(f"deltafleet pool args: {e}") from None
    engine = DeltaServer.bind(dict(args))
    return Ingress.bind(dict(args), engine, TenantDirectory.bind(dict(args), engine))


__all__ = ["DeltaServer", "Ingress", "TenantDirectory", "build_app", "BadRequest", "ConfigError", "EngineStopped"]
