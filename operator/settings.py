"""Operator settings: every one a CLI flag whose default comes from an env var, so the chart's
Deployment sets env (values.yaml -> env) and a developer passes flags.

Pure: `parse_settings(argv, environ)` touches no cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from .images import ML_IMAGE

BACKENDS = ("rayservice", "ray-api")
EXIT_HOOK_ENV = "DELTAFLEET_OPERATOR_EXIT_AFTER_JOB_CREATE"  # test hook: exit right after creating a Job


@dataclass(frozen=True)
class Settings:
    backend: str = "rayservice"
    # rayservice backend
    rayservice_name: str = "deltafleet"
    rayservice_namespace: str = "deltafleet"  # the chart: its release namespace (README installs into deltafleet)
    # ray-api backend
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    # Ray's token authentication (on by default for clusters Ray 2.60 starts itself): a file
    # holding the cluster's token, sent as `Authorization: Bearer`; read on every request so a
    # rotated Secret is picked up. Empty: no token.
    ray_auth_token_file: str = ""
    # Public base URL of Ray Serve's HTTP proxy; endpoints are <serve_url>/<pool>/v1.
    # Empty: the RayService's serve Service (rayservice) or the dashboard's host on :8000 (ray-api).
    serve_url: str = ""
    # The default model store (a FineTune may name its own in spec.modelStore): mounted at
    # /models (api.MODEL_STORE_MOUNT) in compression Jobs.
    store_claim: str = ""  # a PersistentVolumeClaim in the FineTune's namespace ...
    store_host_path: str = ""  # ... or a hostPath (single-node / dev / tests); one of the two
    # The group owning the store's files: compression pods run with it (fsGroup) and write
    # group-writable files; the operator's pod is in it, so it can delete a FineTune's deltas.
    store_group: int = 1000
    # Where this operator process sees the default store (to read result.json and delete
    # deltas; the chart mounts it at /models). Missing: results come from termination
    # messages alone and deleted FineTunes' files are kept.
    operator_store_path: str = "/models"
    # Where serving replicas see the store: delta URIs and `path` bases in the serve config
    # are rewritten from /models to this (the same /models in a RayService's pods).
    replica_store_path: str = "/models"
    # Compression Jobs: the ML image (torch); the operator's own image has none.
    job_image: str = ML_IMAGE
    job_image_pull_policy: str = "IfNotPresent"
    job_image_pull_secrets: str = ""  # comma-separated Secret names (in each FineTune's namespace) for the Job image
    job_runtime_class: str = ""  # RuntimeClass of compression pods (k3s/RKE2 GPU nodes: "nvidia")
    job_service_account: str = ""
    job_run_as_user: int = 1000
    # Serving replicas (one Ray Serve application per pool).
    replica_cpus: float = 1.0
    max_batch_size: int = 16
    # on: replicas reuse a tenant's cached prompt prefixes (never across tenants); off: a
    # tenant's users cannot tell from latency that one of them sent the same prefix before.
    serve_prefix_caching: str = "on"
    # routed: a tenant is loaded on the replicas its requests are routed to (capacity grows with
    # replicas); all: every replica loads every tenant. 0 tenants per replica: the bank's default.
    serve_placement: str = "routed"
    serve_max_tenants_per_replica: int = 0
    serve_auth: str = "keys"  # keys: pools need API keys (from each FineTune's Secret); none: open pools (local use)
    # A file holding the pool status key (the chart mounts a Secret): its sha256 goes into every
    # pool's config and the key reads the replicas' tenant states (GET /<pool>/-/tenants), which
    # decide Served. Re-read on each use. Empty: no key (enough only for pools with auth none).
    serve_status_key_file: str = ""
    device: str = "auto"
    dtype: str = "auto"
    gpu_resource: str = "nvidia.com/gpu"  # extended resource that requests GPUs in Jobs
    # Admin policy over what a FineTune author may ask of its compression Job.
    policy_host_path: str = "deny"  # allow: FineTunes may mount spec.modelStore.hostPath (a node's files)
    policy_allowed_images: str = ""  # comma-separated images FineTunes may name besides job_image
    policy_max_gpus: int = 8
    policy_max_memory: str = ""  # a quantity (e.g. 256Gi) no request or limit may exceed; empty: none
    policy_max_deadline_seconds: int = 86_400
    # ...and of its pool: a pool takes the largest replica bounds and GPU share any of its
    # tenants asks for, so these ceilings keep one tenant from sizing every tenant's pool.
    policy_max_replicas: int = 8
    policy_max_gpus_per_replica: float = 1.0
    log_level: str = "info"
    # Scope and timing.
    namespaces: tuple[str, ...] = field(default_factory=tuple)  # empty: all namespaces
    resync_seconds: float = 10.0  # how often a FineTune is re-checked (Job progress, backend status)
    retry_base_seconds: float = 10.0  # first backoff between failed attempts; doubles per attempt
    retry_max_seconds: float = 600.0
    delete_attempts: int = 5  # finalizer attempts before it is dropped anyway, with a Warning
    liveness_port: int = 8080
    metrics_port: int = 8081  # Prometheus /metrics; 0: off
    # High availability (kopf peering): the name of the KopfPeering (namespaced operator) or
    # ClusterKopfPeering (all namespaces) that the replicas share; the oldest live replica acts,
    # the others wait. Empty: standalone (one replica, no peering objects needed).
    peering: str = ""
    peering_lifetime: int = 10  # seconds a replica's keep-alive counts; a killed active one is replaced within about this
    # Test hook (never set in production): exit the process right after a Job is created,
    # before its name is recorded in status, to prove create-if-absent on restart.
    exit_after_job_create: bool = False

    @property
    def endpoint_base(self) -> str:
        if self.serve_url:
            return self.serve_url.rstrip("/")
        if self.backend == "rayservice":
            return f"http://{self.rayservice_name}-serve-svc.{self.rayservice_namespace}.svc:8000"
        from urllib.parse import urlparse

        host = urlparse(self.ray_dashboard_url).hostname or "127.0.0.1"
        return f"http://{host}:8000"


def _env(environ: dict, name: str, default):
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return type(default)(raw)
    except ValueError:  # as argparse answers a bad flag: one line, exit 2
        print(f"deltafleet operator: error: env {name}={raw!r} is not a valid {type(default).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


# Every setting with a flag: (Settings field, help). The flag is --<field with dashes> (or the
# name in _FLAG_NAMES), its type and default those of the field; its env var is DELTAFLEET_ and
# the flag in upper snake case, and when set it replaces the default. One name per setting:
# a former name still works (installed charts set it) and --help lists it once.
_FLAGS: tuple[tuple[str, str], ...] = (
    ("backend", "how serve configs are applied: a KubeRay RayService, or the Ray dashboard's REST API"),
    ("rayservice_name", "RayService to patch (rayservice backend)"),
    ("rayservice_namespace", "namespace of that RayService"),
    ("ray_dashboard_url", "Ray dashboard (ray-api backend)"),
    ("ray_auth_token_file", "file holding the Ray cluster's auth token (ray-api backend, Ray token authentication)"),
    ("serve_url", "public base URL of Ray Serve's HTTP proxy, for status.endpoint"),
    ("operator_store_path", "where this process sees the default model store (result.json fallback, deleting deltas)"),
    ("replica_store_path", "where serving replicas see the model store"),
    ("store_claim", "PersistentVolumeClaim holding the model store"),
    ("store_host_path", "hostPath holding the model store (dev, single node)"),
    ("store_group", "group owning the store's files (compression pods' fsGroup)"),
    ("job_image", "image of compression Jobs"),
    ("job_image_pull_policy", "imagePullPolicy of compression pods"),
    ("job_runtime_class", "RuntimeClass of compression pods (e.g. nvidia on k3s/RKE2)"),
    ("job_image_pull_secrets",
     "comma-separated image pull Secrets of compression pods (each must exist in the FineTune's namespace)"),
    ("job_service_account", "ServiceAccount of compression pods (default: the namespace's default)"),
    ("job_run_as_user", "non-root uid compression containers run as"),
    ("replica_cpus", "CPUs per serving replica"),
    ("max_batch_size", "sequences a serving replica decodes per step"),
    ("serve_prefix_caching",
     "on: replicas reuse a tenant's own cached prompt prefixes (never another tenant's); off: never"),
    ("serve_placement", "routed: Serve routes each tenant's requests to the replicas holding it, so tenant capacity grows "
     "with replicas; all: every replica loads every tenant"),
    ("serve_max_tenants_per_replica", "tenants one replica holds at most under routed placement (0: what its bank's host "
     "tier fits)"),
    ("serve_auth", "keys: pools require each FineTune's API keys; none: no authentication (local use)"),
    ("serve_status_key_file",
     "file holding the pool status key that reads replicas' tenant states (GET /<pool>/-/tenants; needed with --serve-auth keys)"),
    ("device", "device of serving replicas: auto, cpu, cuda"),
    ("dtype", "dtype of serving replicas: auto, float16, bfloat16, float32"),
    ("gpu_resource", "extended resource name that requests GPUs in compression Jobs"),
    ("policy_host_path", "allow or deny FineTunes' spec.modelStore.hostPath"),
    ("policy_allowed_images",
     "comma-separated images FineTunes may set in spec.compression.image (the Job image always)"),
    ("policy_max_gpus", "most GPUs a compression Job may ask for"),
    ("policy_max_memory", "most memory a compression Job may request or limit (empty: no ceiling)"),
    ("policy_max_deadline_seconds", "longest activeDeadlineSeconds a FineTune may set"),
    ("policy_max_replicas", "most replicas a FineTune may ask of its pool (spec.serving.minReplicas and maxReplicas)"),
    ("policy_max_gpus_per_replica",
     "most GPUs per serving replica a FineTune may ask for (spec.serving.gpusPerReplica)"),
    ("log_level", "DEBUG, INFO, WARNING or ERROR"),
    ("resync_seconds", "how often every FineTune is reconciled even without a change"),
    ("retry_base_seconds", "first backoff after a failed compression attempt"),
    ("retry_max_seconds", "longest backoff between compression attempts"),
    ("delete_attempts", "tries to delete a FineTune's files before its finalizer gives up and says so"),
    ("liveness_port", "kopf liveness endpoint http://0.0.0.0:PORT/healthz"),
    ("metrics_port", "Prometheus metrics at http://0.0.0.0:PORT/metrics (0: off)"),
    ("peering", "kopf peering object shared by the operator's replicas (one acts, the rest wait); empty: standalone"),
    ("peering_lifetime",
     "seconds a replica's peering keep-alive counts: a dead active replica is replaced within about this"),
)
_FLAG_NAMES = {  # named as the serve settings they are (the chart's values.yaml serve: block)
    "backend": "serve-backend",
    "device": "serve-device",
    "dtype": "serve-dtype",
    "max_batch_size": "serve-max-batch-size",
}
_FORMER_FLAGS = {field: f"--{field.replace('_', '-')}" for field in _FLAG_NAMES}
_FORMER_ENV = {
    "serve_url": "DELTAFLEET_SERVE_ENDPOINT",
    "store_claim": "DELTAFLEET_MODEL_STORE_CLAIM",
    "store_host_path": "DELTAFLEET_MODEL_STORE_HOST_PATH",
    "store_group": "DELTAFLEET_MODEL_STORE_GROUP",
    "liveness_port": "DELTAFLEET_HEALTH_PORT",
}
NAMESPACES_ENV = "DELTAFLEET_NAMESPACES"  # the repeatable --namespace, comma-separated


def flag_of(field_name: str) -> str:
    return "--" + _FLAG_NAMES.get(field_name, field_name.replace("_", "-"))


def env_of(field_name: str) -> str:
    return "DELTAFLEET_" + flag_of(field_name)[2:].upper().replace("-", "_")


_CHOICES = {
    "backend": BACKENDS,
    "job_image_pull_policy": ("Always", "IfNotPresent", "Never"),
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "serve_auth": ("keys", "none"),
    "serve_prefix_caching": ("on", "off"),
    "serve_placement": ("routed", "all"),
    "policy_host_path": ("allow", "deny"),
    "log_level": ("debug", "info", "warning", "error"),
}


def build_parser(environ: dict | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    d = Settings()
    p = argparse.ArgumentParser(prog="deltafleet operator", description="Run the deltafleet Kubernetes operator (kopf).")
    for name, text in _FLAGS:
        default, var, former = getattr(d, name), env_of(name), _FORMER_ENV.get(name)
        if former:  # the new name wins over the former one
            default = _env(env, former, default)
        names = [flag_of(name)] + ([_FORMER_FLAGS[name]] if name in _FORMER_FLAGS else [])
        p.add_argument(*names, dest=name, type=type(default), default=_env(env, var, default),
                       choices=_CHOICES.get(name), help=f"{text} [env {var}" + (f", formerly {former}]" if former else "]"))
    p.add_argument("--namespace", "-n", action="append", dest="namespaces", default=None,
                   help=f"watch only this namespace (repeat for more; default all) [env {NAMESPACES_ENV}, "
                        "comma-separated]")
    p.add_argument("--check", action="store_true",
                   help="check the API server, the CRD and the serve backend once, print the result and exit")
    p.add_argument("--verbose", "-v", action="store_true", help="log at debug level (overrides --log-level)")
    return p


def settings_from_args(args: argparse.Namespace, environ: dict | None = None) -> Settings:
    env = os.environ if environ is None else environ
    namespaces = args.namespaces
    if namespaces is None:
        namespaces = [n.strip() for n in env.get(NAMESPACES_ENV, "").split(",") if n.strip()]
    if args.store_claim and args.store_host_path:
        raise SystemExit("deltafleet operator: set one of --store-claim / --store-host-path, not both")
    for flag, value in (("--replica-store-path", args.replica_store_path), ("--operator-store-path", args.operator_store_path or "/")):
        if not value.startswith("/"):
            raise SystemExit(f"deltafleet operator: {flag} must be an absolute path, got {value!r}")
    if args.peering and args.peering_lifetime < 5:  # keep-alives come 1-10 s before expiry (kopf)
        raise SystemExit(f"deltafleet operator: --peering-lifetime must be at least 5 seconds, got {args.peering_lifetime}")
    values = {name: getattr(args, name) for name, _ in _FLAGS}
    return Settings(**{
        **values,
        "ray_dashboard_url": args.ray_dashboard_url.rstrip("/"),
        "operator_store_path": args.operator_store_path.rstrip("/"),
        "replica_store_path": args.replica_store_path.rstrip("/") or "/",
        "namespaces": tuple(sorted(set(namespaces))),
        "exit_after_job_create": _env(env, EXIT_HOOK_ENV, False),
    })


def parse_settings(argv: list[str], environ: dict | None = None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser(environ).parse_args(argv)
    return settings_from_args(args, environ), args
