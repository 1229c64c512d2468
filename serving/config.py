"""The serve-config contract: what the operator generates and `deltafleet serve --config` reads (the owner module).

A pool file is a standard Ray Serve config; each application is one base-model pool of
three deployments — the Ingress (OpenAI API, keys, limits, streaming), the DeltaServer engine
replicas (one base + the tenants each holds, batched together) and the TenantDirectory
(which replica holds which tenant; the tenant-status route):

    applications:
      - name: <pool>                      # one application per base-model pool
        route_prefix: /<pool>             # endpoint http://<host>:8000/<pool>/v1 ; model = tenant name
        import_path: deltafleet.serving.app:build_app
        args: {pool: <pool>, base_model: <local path or HF id>, device: auto, dtype: auto,
               max_batch_size: 16, max_queue: 256, gpu_bank_bytes: <int>, cpu_bank_bytes: <int>,
               store_root: <optional dir; delta URIs must resolve inside it>, max_request_bytes: 4194304,
               kv_cache_bytes: <optional int>, kv_block_size: 16, max_step_tokens: 512,
               decode_mode: auto, prefix_caching: true, auth: keys,   # or none: no API keys (local use only)
               placement: routed, max_tenants_per_replica: <optional int>}
        deployments:
          - name: Ingress
            num_replicas: 1
            max_ongoing_requests: 4096        # async and light: the engine replicas limit the load
            ray_actor_options: {num_cpus: 0}
            user_config: <the tenant set, as below>
          - name: DeltaServer
            autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 24}  # 1.5 x max_batch_size
            max_ongoing_requests: 288         # batch + max_queue + a batch: the engine refuses (429) before Serve
            max_queued_requests: 128          # Ray's router: a safety net (a 503 from the ingress past it)
            ray_actor_options: {num_gpus: 0, num_cpus: 1}
            request_router_config:            # placement: routed (serving/routing.py)
              request_router_class: deltafleet.serving.routing:TenantRouter
              request_router_kwargs: {spread_at: 16}   # max_batch_size
            user_config:
              tenants:
                "<namespace>/<name>": {uri: "file:///models/deltas/ns/name/g1/delta.safetensors",
                                       key_sha256: [<sha256 hex of each API key that may call it>]}
              status_key_sha256: <sha256 hex of the pool status key>   # optional; who may read TENANT_STATUS_ROUTE
          - name: TenantDirectory
            user_config: <the tenant set, as above>

Placement (`args.placement`): `routed` (the default) sends each request to the DeltaServer
replicas through a handle whose multiplexed model id is the tenant, so Ray Serve routes it
to a replica that already holds the tenant (or, when none does or those are busy, to the
one holding the fewest); a replica holds at most `max_tenants_per_replica` (default: what
its bank's host tier fits) and lets the least recently used go. Tenant capacity grows with
replicas. `all`: every replica loads every tenant (a small pool, every tenant instant
everywhere; capacity is one replica's).

`serve_application(args, tenants, **deployment_options)` builds one such application (the
operator's serveconfig.py, `deltafleet demo` and the tests use it, so the import path and the
deployment names are spelled only here); the options are the DeltaServer deployment's. A pool name is a DNS label (`POOL_NAME_PATTERN`, at
most `POOL_NAME_MAX_LENGTH`): the operator's FineTune schema and `AppArgs.pool` use the same rule.

`args` -> `AppArgs` (fixed for the replica's life); `user_config` -> `TenantsConfig`
(applied by `reconfigure()` without restarting the replica: new tenants load in the
background, removed ones unload). Tenant names may contain "/". The base model itself is
served under the names in `BASE_ALIASES` plus the pool name, so tenants may not use them.

API keys (`args.auth: keys`, the default): a request carries `Authorization: Bearer <key>`;
the replica hashes it and serves only the tenants whose `key_sha256` holds the digest (any
other model, existing or not, is a 404), and the base model to any valid key; no key or an
unknown one is a 401. The config holds digests only, so it never carries a usable key, and a
new config (a rotated key) takes effect at `reconfigure()`, without a restart.

Tenant states (`GET /<pool>` + `TENANT_STATUS_ROUTE`): the ingress answers the directory's
`TenantStatesReport`, `{"replica": <ingress id>, "replicas": [<engine replica ids>], "tenants":
{"<tenant>": {"state": loading|ready|failed, "error": <str|null>, "replicas": [<ids holding it now>]}}}`
for every tenant of the pool: ready = its delta loaded on some replica (by traffic or by the
directory's load check), failed = a load of it failed (the replica's message); the operator
reads it with `parse_tenant_states` (a body that is not one is refused with one line naming
the field). With `auth: none` the route is open; with
`auth: keys` only a bearer key whose sha256 is `user_config.status_key_sha256` reads it (the
operator's status key), and anyone else gets the 404 of an unknown route, so tenant names
never leak to callers.

Delta URIs: `file://<absolute path>` or a plain absolute path, nothing else (no http, s3,
relative paths). When `store_root` is set, the resolved path (symlinks and `..` followed)
must lie inside it, so a config cannot make a replica read arbitrary files.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The contract's names, owned here and imported by the operator (operator/serveconfig.py,
# operator/replica_status.py, operator/api.py): this module is torch-free so the operator image can import it.
IMPORT_PATH = "deltafleet.serving.app:build_app"
INGRESS = "Ingress"  # the HTTP deployment: OpenAI API, keys, limits; calls DEPLOYMENT through a handle
DEPLOYMENT = "DeltaServer"  # the engine deployment: the replicas that hold tenants and decode
DIRECTORY = "TenantDirectory"  # which replica holds which tenant (TENANT_STATUS_ROUTE)
ROUTER_CLASS = "deltafleet.serving.routing:TenantRouter"  # the engine deployment's request router (placement: routed)
TENANT_SET_DEPLOYMENTS = (INGRESS, DEPLOYMENT, DIRECTORY)  # each takes the tenant set as its user_config
INGRESS_MAX_ONGOING = 4096  # the ingress only awaits the engine: the engine replicas' limits answer first
Placement = Literal["routed", "all"]
DecodeMode = Literal["auto", "graphs", "static", "dynamic"]
DECODE_MODES = DecodeMode.__args__
BASE_ALIASES = ("base",)  # OpenAI `model` names that mean the pool's base model (besides the pool name)
TENANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"
TENANT_NAME = re.compile(TENANT_NAME_PATTERN)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A pool is one Ray Serve application: its name (also its route prefix /<pool>) is a DNS label.
POOL_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
POOL_NAME_MAX_LENGTH = 63
TENANT_STATUS_ROUTE = "/-/tenants"  # under the application's route_prefix: the replica's tenant load states
TenantStateName = Literal["loading", "ready", "failed"]
TENANT_STATES = TenantStateName.__args__  # what the route reports per tenant (serving/bank.py's)


class ConfigError(ValueError):
    """A serve config that cannot be used; one line saying what and where."""


class AppArgs(BaseModel):
    """`args` of one application: fixed for the life of a replica."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(min_length=1, max_length=POOL_NAME_MAX_LENGTH, pattern=POOL_NAME_PATTERN)
    base_model: str = Field(min_length=1, description="local folder or HF id, loaded with from_pretrained")
    device: str = Field("auto", description="auto (cuda if available else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(256, ge=1)
    gpu_bank_bytes: int = Field(4 << 30, ge=0, description="device-tier byte budget for hot deltas")
    cpu_bank_bytes: int = Field(16 << 30, ge=0, description="CPU-tier byte budget for warm deltas")
    store_root: str | None = Field(None, description="delta URIs must resolve inside this folder")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get a 413")
    load_timeout_s: float = Field(120.0, gt=0, description="how long a request waits for its tenant to load")
    queue_timeout_s: float = Field(300.0, gt=0, description="how long a request waits for a batch row (then 429)")
    max_queue_per_tenant: int | None = Field(None, ge=1, description="one tenant's share of max_queue (default: half)")
    kv_growth_horizon: int = Field(256, ge=0, description="tokens of each admitted sequence's growth that admission "
                                   "reserves KV for: new work waits rather than preempting running work")
    auth: Literal["keys", "none"] = Field(
        "keys", description="keys: a request needs `Authorization: Bearer <key>` and reaches only the tenants whose "
        "key_sha256 holds that key's digest (the base: any valid key); none: no authentication, for local use")
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache size; default: 80% of free GPU memory, 1 GiB on CPU")
    kv_block_size: int = Field(16, ge=1, le=1024, description="token positions per KV block")
    max_step_tokens: int = Field(512, ge=1, description="tokens per engine step: decode rows plus prefill chunks")
    decode_mode: DecodeMode = Field(
        "auto", description="decode-only steps: graphs (fixed-shape buckets replayed as CUDA graphs), static (the same "
        "buckets run eagerly), dynamic (packed, no padding); auto = graphs on CUDA, dynamic on CPU")
    placement: Placement = Field(
        "routed", description="routed: a tenant is loaded on the replicas its requests are routed to (Serve's "
        "multiplexing), so tenant capacity grows with replicas; all: every replica loads every tenant")
    max_tenants_per_replica: int | None = Field(
        None, ge=1, le=65536, description="tenants one replica holds at most under placement: routed, dropping the "
        "least recently used (default: what its bank's host tier fits)")
    prefix_caching: bool = Field(
        True, description="reuse the KV blocks of a prompt prefix computed earlier for the same tenant (keyed by "
        "the tenant's registration and the tokens: never across tenants)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("store_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_absolute():
            raise ValueError(f"store_root must be an absolute path, got {v!r}")
        return v


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str = Field(min_length=1)
    # sha256 hex digests of the API keys that may call this tenant (never the keys themselves).
    key_sha256: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("key_sha256")
    @classmethod
    def _digests(cls, v: list[str]) -> list[str]:
        for d in v:
            if not SHA256_HEX.fullmatch(d):
                raise ValueError(f"key_sha256 entries must be 64 lowercase hex characters (a sha256 digest), got "
                                 f"{len(d)} characters that are not one{_KEY_HINT}")
        return v


# The value is never echoed: what lands in a digest field by mistake is most often the key itself.
_KEY_HINT = " (if that is an API key, store its sha256 instead: printf %s KEY | sha256sum)"


def key_digest(key: str) -> str:
    """What a tenant's key_sha256 holds for an API key: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class TenantsConfig(BaseModel):
    """`user_config` of the DeltaServer deployment: the tenant set (diffed on every update)."""

    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)
    # sha256 hex of the pool status key: its bearer may read TENANT_STATUS_ROUTE under auth: keys.
    status_key_sha256: str | None = None

    @field_validator("status_key_sha256")
    @classmethod
    def _status_digest(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_HEX.fullmatch(v):
            raise ValueError(f"status_key_sha256 must be 64 lowercase hex characters (a sha256 digest), got "
                             f"{len(v)} characters that are not one{_KEY_HINT}")
        return v

    @field_validator("tenants")
    @classmethod
    def _names(cls, v: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for name in v:
            if not TENANT_NAME.fullmatch(name) or len(name) > 253:
                raise ValueError(f"tenant name {name!r} must be segments of [A-Za-z0-9._-] separated by '/'")
            if name in BASE_ALIASES:
                raise ValueError(f"tenant name {name!r} is reserved for the base model")
        return v


class TenantReport(BaseModel):
    """One tenant on one engine replica, as the replica reports it to the directory."""

    model_config = ConfigDict(extra="ignore")
    state: TenantStateName
    error: str | None = None
    uri: str = ""  # the delta it holds (a tenant's new delta is another URI)


class TenantLoadState(BaseModel):
    """One tenant of the pool: whether its delta loads, and the replicas holding it now."""

    model_config = ConfigDict(extra="ignore")  # a newer replica's extra fields do not break an older reader
    state: TenantStateName
    error: str | None = Field(None, description="why it is failed (or still loading after failed reads)")
    replicas: list[str] = Field(default_factory=list, description="engine replicas holding it now")


class TenantStatesReport(BaseModel):
    """The body of TENANT_STATUS_ROUTE: who answered, the pool's live engine replicas and every
    tenant's state. serving/directory.py builds it, the ingress serializes it, and
    operator/replica_status.py validates it."""

    model_config = ConfigDict(extra="ignore")
    replica: str = ""
    replicas: list[str] = Field(default_factory=list)
    tenants: dict[str, TenantLoadState]


def serve_application(args: AppArgs | dict, tenants: TenantsConfig | dict, ingress_replicas: int = 1,
                      **deployment: object) -> dict:
    """One application of a serve config, validated as replicas will: the pool `args`, its
    DeltaServer deployment with the given Ray Serve options (autoscaling_config, num_replicas,
    max_ongoing_requests, ray_actor_options, ...), `ingress_replicas` Ingress replicas, one
    TenantDirectory, and the tenant set as each one's user_config.
    Raises ConfigError for what a replica would refuse."""
    args = args if isinstance(args, AppArgs) else parse_args(args)
    raw_tenants = tenants.model_dump() if isinstance(tenants, TenantsConfig) else tenants
    tenant_set = parse_tenants(raw_tenants, pool=args.pool)
    if args.placement == "routed":  # a holder is free while it has less than a batch in flight (serving/routing.py)
        router = {"request_router_class": ROUTER_CLASS, "request_router_kwargs": {"spread_at": args.max_batch_size}}
        deployment = {"request_router_config": router, **deployment}

    def user_config() -> dict:  # one copy each: a YAML dump would otherwise write aliases
        return tenant_set.model_dump(exclude_defaults=True)

    return {
        "name": args.pool,
        "route_prefix": f"/{args.pool}",
        "import_path": IMPORT_PATH,
        "args": args.model_dump(exclude_unset=True),
        "deployments": [
            {"name": DEPLOYMENT, **deployment, "user_config": user_config()},
            {"name": INGRESS, "num_replicas": ingress_replicas, "max_ongoing_requests": INGRESS_MAX_ONGOING,
             "ray_actor_options": {"num_cpus": 0}, "user_config": user_config()},
            {"name": DIRECTORY, "user_config": user_config()},
        ],
    }


def check_tenant_sets(app: dict) -> None:
    """The three deployments of an application must take the same tenant set: a hand-written
    config that gives it to the DeltaServer only would leave the ingress serving no tenant."""
    sets = {dep.get("name"): dep.get("user_config") for dep in app.get("deployments") or []
            if dep.get("name") in TENANT_SET_DEPLOYMENTS}
    if not any(sets.values()):
        return
    differ = [name for name in TENANT_SET_DEPLOYMENTS if sets.get(name) != sets.get(DEPLOYMENT)]
    if differ:
        raise ConfigError(f"deployments {', '.join(TENANT_SET_DEPLOYMENTS)} must each list the same user_config (the "
                          f"tenant set); {', '.join(differ)} differs or is missing (a YAML anchor writes it once)")


def parse_args(raw: dict) -> AppArgs:
    return _parse(AppArgs, raw, "args")


def parse_tenants(raw: dict | None, pool: str | None = None) -> TenantsConfig:
    cfg = _parse(TenantsConfig, raw or {}, "user_config")
    if pool is not None and pool in cfg.tenants:
        raise ConfigError(f"user_config.tenants: tenant name {pool!r} is the pool's own name (reserved for the base model)")
    return cfg


def parse_tenant_states(raw: object) -> TenantStatesReport:
    return _parse(TenantStatesReport, raw, "tenant states")


def resolve_uri(uri: str, store_root: str | None = None) -> Path:
    """A delta URI -> an absolute local path, refusing other schemes and escapes from store_root."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"delta URI {uri!r}: file:// URIs must not name a host")
        raw = unquote(parsed.path)
    elif parsed.scheme == "" and uri.startswith("/"):
        raw = uri
    else:
        raise ConfigError(f"delta URI {uri!r}: only file:// URIs and absolute paths are supported")
    if not raw.startswith("/"):
        raise ConfigError(f"delta URI {uri!r}: path must be absolute")
    path = Path(raw).resolve()
    if store_root is not None:
        root = Path(store_root).resolve()
        if path != root and root not in path.parents:
            raise ConfigError(f"delta URI {uri!r} resolves to {path}, outside store_root {root}")
    return path


def _parse(model: type[BaseModel], raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{where}.{loc}: {err['msg']}{more}") from None
