"""Operator settings: every one a CLI flag whose default comes from an env var, so the chart's
Deployment sets env (values.yaml -> env) and a developer passes flags.

Pure: `parse_settings(argv, environ)` touches no cluster.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

BACKENDS = ("rayservice", "ray-api")
EXIT_HOOK_ENV = "DELTAFLEET_OPERATOR_EXIT_AFTER_JOB_CREATE"  # test hook: exit right after creating a Job


@dataclass(frozen=True)
class Settings:
    backend: str = "rayservice"
    # rayservice backend
    rayservice_name: str = "deltafleet"
    rayservice_namespace: str = "deltafleet-system"
    # ray-api backend
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    # Public base URL of Ray Serve's HTTP proxy; endpoints are <serve_url>/<pool>/v1.
    # Empty: the RayService's serve Service (rayservice) or the dashboard's host on :8000 (ray-api).
    serve_url: str = ""
    # The default model store (a FineTune may name its own in spec.modelStore): mounted at
    # /models (api.MODEL_STORE_MOUNT) in compression Jobs.
    store_claim: str = ""  # a PersistentVolumeClaim in the FineTune's namespace ...
    store_host_path: str = ""  # ... or a hostPath (single-node / dev / tests); one of the two
    # Where this operator process sees the default store (to read result.json and delete
    # deltas; the chart mounts it at /models). Missing: results come from termination
    # messages alone and deleted FineTunes' files are kept.
    operator_store_path: str = "/models"
    # Where serving replicas see the store: delta URIs and `path` bases in the serve config
    # are rewritten from /models to this (the same /models in a RayService's pods).
    replica_store_path: str = "/models"
    # Compression Jobs.
    job_image: str = "ghcr.io/deltafleet/deltafleet:0.1.0"
    job_image_pull_policy: str = "IfNotPresent"
    job_service_account: str = ""
    job_run_as_user: int = 1000
    # Serving replicas (one Ray Serve application per pool).
    replica_cpus: float = 1.0
    max_batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    gpu_resource: str = "nvidia.com/gpu"  # extended resource that requests GPUs in Jobs
    log_level: str = "info"
    # Scope and timing.
    namespaces: tuple[str, ...] = field(default_factory=tuple)  # empty: all namespaces
    resync_seconds: float = 10.0  # how often a FineTune is re-checked (Job progress, backend status)
    retry_base_seconds: float = 10.0  # first backoff between failed attempts; doubles per attempt
    retry_max_seconds: float = 600.0
    delete_attempts: int = 5  # finalizer attempts before it is dropped anyway, with a Warning
    liveness_port: int = 8080
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
    return type(default)(raw)


def build_parser(environ: dict | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    d = Settings()
    p = argparse.ArgumentParser(prog="deltafleet operator", description="Run the deltafleet Kubernetes operator (kopf).")
    add = p.add_argument
    add("--backend", choices=BACKENDS, default=_env(env, "DELTAFLEET_SERVE_BACKEND", d.backend),
        help="how serve configs are applied [env DELTAFLEET_SERVE_BACKEND]")
    add("--rayservice-name", default=_env(env, "DELTAFLEET_RAYSERVICE_NAME", d.rayservice_name),
        help="RayService to patch (rayservice backend) [env DELTAFLEET_RAYSERVICE_NAME]")
    add("--rayservice-namespace", default=_env(env, "DELTAFLEET_RAYSERVICE_NAMESPACE", d.rayservice_namespace),
        help="[env DELTAFLEET_RAYSERVICE_NAMESPACE]")
    add("--ray-dashboard-url", default=_env(env, "DELTAFLEET_RAY_DASHBOARD_URL", d.ray_dashboard_url),
        help="Ray dashboard (ray-api backend) [env DELTAFLEET_RAY_DASHBOARD_URL]")
    add("--serve-url", default=_env(env, "DELTAFLEET_SERVE_ENDPOINT", d.serve_url),
        help="public base URL of Ray Serve's HTTP proxy, for status.endpoint [env DELTAFLEET_SERVE_ENDPOINT]")
    add("--operator-store-path", default=_env(env, "DELTAFLEET_OPERATOR_STORE_PATH", d.operator_store_path),
        help="where this process sees the default model store (result.json fallback, deleting deltas) [env DELTAFLEET_OPERATOR_STORE_PATH]")
    add("--replica-store-path", default=_env(env, "DELTAFLEET_REPLICA_STORE_PATH", d.replica_store_path),
        help="where serving replicas see the model store [env DELTAFLEET_REPLICA_STORE_PATH]")
    add("--store-claim", default=_env(env, "DELTAFLEET_MODEL_STORE_CLAIM", d.store_claim),
        help="PersistentVolumeClaim holding the model store [env DELTAFLEET_MODEL_STORE_CLAIM]")
    add("--store-host-path", default=_env(env, "DELTAFLEET_MODEL_STORE_HOST_PATH", d.store_host_path),
        help="hostPath holding the model store (dev, single node) [env DELTAFLEET_MODEL_STORE_HOST_PATH]")
    add("--job-image", default=_env(env, "DELTAFLEET_JOB_IMAGE", d.job_image),
        help="image of compression Jobs [env DELTAFLEET_JOB_IMAGE]")
    add("--job-image-pull-policy", default=_env(env, "DELTAFLEET_JOB_IMAGE_PULL_POLICY", d.job_image_pull_policy),
        choices=("Always", "IfNotPresent", "Never"), help="[env DELTAFLEET_JOB_IMAGE_PULL_POLICY]")
    add("--job-service-account", default=_env(env, "DELTAFLEET_JOB_SERVICE_ACCOUNT", d.job_service_account),
        help="ServiceAccount of compression pods (default: the namespace's default) [env DELTAFLEET_JOB_SERVICE_ACCOUNT]")
    add("--job-run-as-user", type=int, default=_env(env, "DELTAFLEET_JOB_RUN_AS_USER", d.job_run_as_user),
        help="[env DELTAFLEET_JOB_RUN_AS_USER]")
    add("--replica-cpus", type=float, default=_env(env, "DELTAFLEET_REPLICA_CPUS", d.replica_cpus),
        help="CPUs per serving replica [env DELTAFLEET_REPLICA_CPUS]")
    add("--max-batch-size", type=int, default=_env(env, "DELTAFLEET_SERVE_MAX_BATCH_SIZE", d.max_batch_size),
        help="[env DELTAFLEET_SERVE_MAX_BATCH_SIZE]")
    add("--device", default=_env(env, "DELTAFLEET_SERVE_DEVICE", d.device),
        help="device of serving replicas: auto, cpu, cuda [env DELTAFLEET_SERVE_DEVICE]")
    add("--dtype", default=_env(env, "DELTAFLEET_SERVE_DTYPE", d.dtype), choices=("auto", "float32", "float16", "bfloat16"),
        help="[env DELTAFLEET_SERVE_DTYPE]")
    add("--gpu-resource", default=_env(env, "DELTAFLEET_GPU_RESOURCE", d.gpu_resource),
        help="extended resource name that requests GPUs in compression Jobs [env DELTAFLEET_GPU_RESOURCE]")
    add("--log-level", default=_env(env, "DELTAFLEET_LOG_LEVEL", d.log_level), choices=("debug", "info", "warning", "error"),
        help="[env DELTAFLEET_LOG_LEVEL]")
    add("--namespace", "-n", action="append", dest="namespaces", default=None,
        help="watch only this namespace (repeat for more; default all) [env DELTAFLEET_NAMESPACES, comma-separated]")
    add("--resync-seconds", type=float, default=_env(env, "DELTAFLEET_RESYNC_SECONDS", d.resync_seconds),
        help="[env DELTAFLEET_RESYNC_SECONDS]")
    add("--retry-base-seconds", type=float, default=_env(env, "DELTAFLEET_RETRY_BASE_SECONDS", d.retry_base_seconds),
        help="first backoff after a failed compression attempt [env DELTAFLEET_RETRY_BASE_SECONDS]")
    add("--retry-max-seconds", type=float, default=_env(env, "DELTAFLEET_RETRY_MAX_SECONDS", d.retry_max_seconds),
        help="[env DELTAFLEET_RETRY_MAX_SECONDS]")
    add("--delete-attempts", type=int, default=_env(env, "DELTAFLEET_DELETE_ATTEMPTS", d.delete_attempts),
        help="[env DELTAFLEET_DELETE_ATTEMPTS]")
    add("--liveness-port", type=int, default=_env(env, "DELTAFLEET_HEALTH_PORT", d.liveness_port),
        help="kopf liveness endpoint http://0.0.0.0:PORT/healthz [env DELTAFLEET_HEALTH_PORT]")
    add("--check", action="store_true",
        help="check the API server, the CRD and the serve backend once, print the result and exit")
    add("--verbose", "-v", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace, environ: dict | None = None) -> Settings:
    env = os.environ if environ is None else environ
    namespaces = args.namespaces
    if namespaces is None:
        namespaces = [n.strip() for n in env.get("DELTAFLEET_NAMESPACES", "").split(",") if n.strip()]
    if args.store_claim and args.store_host_path:
        raise SystemExit("deltafleet operator: set one of --store-claim / --store-host-path, not both")
    for flag, value in (("--replica-store-path", args.replica_store_path), ("--operator-store-path", args.operator_store_path or "/")):
        if not value.startswith("/"):
            raise SystemExit(f"deltafleet operator: {flag} must be an absolute path, got {value!r}")
    return Settings(
        backend=args.backend,
        rayservice_name=args.rayservice_name,
        rayservice_namespace=args.rayservice_namespace,
        ray_dashboard_url=args.ray_dashboard_url.rstrip("/"),
        serve_url=args.serve_url,
        operator_store_path=args.operator_store_path.rstrip("/"),
        replica_store_path=args.replica_store_path.rstrip("/") or "/",
        store_claim=args.store_claim,
        store_host_path=args.store_host_path,
        job_image=args.job_image,
        job_image_pull_policy=args.job_image_pull_policy,
        job_service_account=args.job_service_account,
        job_run_as_user=args.job_run_as_user,
        replica_cpus=args.replica_cpus,
        max_batch_size=args.max_batch_size,
        device=args.device,
        dtype=args.dtype,
        gpu_resource=args.gpu_resource,
        log_level=args.log_level,
        namespaces=tuple(sorted(set(namespaces))),
        resync_seconds=args.resync_seconds,
        retry_base_seconds=args.retry_base_seconds,
        retry_max_seconds=args.retry_max_seconds,
        delete_attempts=args.delete_attempts,
        liveness_port=args.liveness_port,
        exit_after_job_create=_env(env, EXIT_HOOK_ENV, False),
    )


def parse_settings(argv: list[str], environ: dict | None = None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser(environ).parse_args(argv)
    return settings_from_args(args, environ), args
