"""What the reconciler sees: one FineTune and everything its decision needs, gathered once.

`gather` reads (the FineTune's Jobs and their pods, result.json, the store's claim, the API
key Secret, the pool's application through the backend) and returns a frozen `Observed`; it
writes nothing. plan.decide turns it into a Plan; controller.apply writes the Plan. The
gathering functions take the Kubernetes API objects (`Kube`) and the backend as arguments, so a
test passes fakes (tests/operator/fakes.py).
"""

from __future__ import annotations

import base64
import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deltafleet.compress.result import RESULT_FILE, CompressResult
from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator import jobs, replica_status
from deltafleet.operator import serveconfig as sc
from deltafleet.operator.backend import AppStatus, Backend, BackendError
from deltafleet.operator.decisions import Attempt, Keys, PoolView, eligible, tenant
from deltafleet.operator.jobs import JobState
from deltafleet.operator.settings import Settings
from deltafleet.operator.validation import policy_problems, spec_problems
from deltafleet.serving.config import key_digest

# The reconciler's clock (seconds since the epoch); Controller takes another in tests.
wall_clock: Callable[[], float] = time.time

# How often a reconcile checks that the backend still holds the applied serve config.
CONFIG_CHECK_S = 10.0
STATUS_CACHE_S = 1.0  # the pools' statuses are read at most once a second, whatever the number of FineTunes


@dataclass(frozen=True)
class Kube:
    """The Kubernetes API objects the reconciler uses."""

    custom: client.CustomObjectsApi
    batch: client.BatchV1Api
    core: client.CoreV1Api

    @classmethod
    def connect(cls, api_client: client.ApiClient | None = None) -> "Kube":
        return cls(client.CustomObjectsApi(api_client), client.BatchV1Api(api_client), client.CoreV1Api(api_client))


@dataclass(frozen=True)
class ServingState:
    """What this process last applied: the tenants (by FineTune) and the config hash."""

    tenants: dict[str, sc.Tenant] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)
    digest: str | None = None
    synced: bool = False


@dataclass(frozen=True)
class Meta:
    """The metadata the reconciler reads."""

    namespace: str
    name: str
    uid: str
    generation: int
    annotations: dict
    created: str
    labels: dict = field(default_factory=dict)  # a Job inherits them (kopf.adopt)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def body(self) -> dict:
        """Enough of the object to own a Job (kopf.adopt: owner reference, namespace, labels) and
        to be an Event's subject."""
        meta = {"name": self.name, "namespace": self.namespace, "uid": self.uid, "labels": dict(self.labels)}
        return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta}


@dataclass(frozen=True)
class Observed:
    """One FineTune as the reconciler sees it, at `now`. Read-only: plan.decide copies what it changes."""

    now: float
    meta: Meta
    status: dict  # the status as the API server holds it
    ft: api.FineTune | None  # None: it did not parse (problems say why)
    problems: tuple[str, ...] = ()  # the schema, the code or the policy refuses the spec
    refused_by_policy: bool = False
    digest: str = ""  # the compression input's hash ...
    hash_current: bool = True  # ... and whether the annotation already records it
    attempts: tuple[Attempt, ...] = ()  # this input's Jobs and outcomes, oldest first (read only without a delta)
    store_problem: str | None = None  # why a new Job's store claim cannot be mounted (read where a Job may be made)
    keys: Keys = Keys()  # the API key Secret's digests (read only when there is a delta to serve)
    applied: sc.Tenant | None = None  # this FineTune's tenant in the config this process applied last
    synced: bool = False  # whether this process has applied a config at all
    pool: PoolView = PoolView()  # the pool's application (read only when this FineTune is in the applied config)

    @property
    def delta(self) -> api.DeltaStatus | None:
        """The recorded delta, if it is of the current compression input."""
        return self.ft.status.delta if self.ft is not None and self.hash_current else None


# ---------------------------------------------------------------- the FineTune


def read(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict | None:
    """The FineTune as the API server has it now; None when it is gone."""
    try:
        return custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def meta_of(raw: dict) -> Meta:
    m = raw["metadata"]
    return Meta(m["namespace"], m["name"], m.get("uid", ""), m.get("generation", 1), dict(m.get("annotations") or {}),
                m.get("creationTimestamp", ""), dict(m.get("labels") or {}))


def parse(raw: dict, settings: Settings) -> tuple[api.FineTune | None, tuple[str, ...], bool]:
    """The FineTune parsed once, and what refuses it: (ft, problems, refused by policy)."""
    try:
        ft = api.FineTune.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        return None, (f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}",), False
    if problems := spec_problems(ft, settings):
        return ft, tuple(problems), False
    problems = policy_problems(ft, settings)
    return ft, tuple(problems), bool(problems)


def gather(raw: dict, *, kube: Kube, pools: "PoolStatuses", serving: ServingState, settings: Settings,
           now: float) -> Observed:
    """Everything plan.decide needs about this FineTune, read once."""
    meta = meta_of(raw)
    status = copy.deepcopy(raw.get("status") or {})
    ft, problems, by_policy = parse(raw, settings)
    if problems:  # nothing runs that the schema, the code or the policy refuses: nothing more to read
        return Observed(now, meta, status, ft, problems, by_policy)
    digest = comp.compression_hash(ft.spec)
    current = meta.annotations.get(comp.HASH_ANNOTATION) == digest
    seen = Observed(now, meta, status, ft, digest=digest, hash_current=current,
                    applied=serving.tenants.get(meta.key), synced=serving.synced)
    attempts = tuple(read_attempts(kube, meta, digest, settings)) if seen.delta is None else ()
    brought = any(a.outcome.state == JobState.SUCCEEDED and a.outcome.result is not None for a in attempts)
    running = any(a.outcome.state == JobState.RUNNING for a in attempts)
    # The claim matters only where a Job may be created; the keys only where there is a delta to serve.
    may_create = seen.delta is None and not (brought or running)
    store = store_problem(kube.core, ft, meta.namespace, settings) if may_create else None
    keys = read_keys(kube.core, ft, meta.namespace) if seen.delta is not None or brought else Keys()
    pool = pool_view(pools, serving, meta.key, seen.applied)
    return replace(seen, attempts=attempts, store_problem=store, keys=keys, pool=pool)


# ---------------------------------------------------------------- its compression attempts


def _json(response) -> dict:
    """A raw API response as the API's own JSON (camelCase), not the typed client's snake_case."""
    return json.loads(response.data)


def list_jobs(batch: client.BatchV1Api, meta: Meta, digest: str) -> list[dict]:
    """This FineTune's Jobs for this compression input, oldest attempt first (owned by this
    very object: a recreated FineTune of the same name never sees its predecessor's)."""
    selector = f"{comp.LABEL_FINETUNE}={meta.name},{comp.LABEL_HASH}={digest}"
    items = _json(batch.list_namespaced_job(meta.namespace, label_selector=selector, _preload_content=False))["items"]
    owned = [j for j in items if any(o.get("uid") == meta.uid for o in j["metadata"].get("ownerReferences") or [])]
    return sorted(owned, key=lambda j: int(j["metadata"]["labels"].get(comp.LABEL_ATTEMPT, "0")))


def job_pod(core: client.CoreV1Api, namespace: str, job_name: str) -> dict | None:
    """The Job's (only: restartPolicy Never, backoffLimit 0) pod, newest if there are more."""
    selector = f"batch.kubernetes.io/job-name={job_name}"
    items = _json(core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))["items"]
    return sorted(items, key=lambda p: p["metadata"].get("creationTimestamp", ""))[-1] if items else None


def result_file(settings: Settings, namespace: str, name: str, generation: int) -> CompressResult | None:
    """Fallback when the termination message is missing: result.json on the store, if this
    process has the (default) store mounted."""
    if not Path(settings.operator_store_path or "/nonexistent").is_dir():
        return None
    path = Path(comp.output_dir(namespace, name, generation, root=settings.operator_store_path)) / RESULT_FILE
    try:
        return CompressResult.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None


def read_attempts(kube: Kube, meta: Meta, digest: str, settings: Settings) -> list[Attempt]:
    """This input's attempts with their outcomes (the pod's, else result.json for a result)."""
    attempts = []
    for j in list_jobs(kube.batch, meta, digest):
        labels = j["metadata"]["labels"]
        job_gen = int(labels[comp.LABEL_GENERATION])
        o = jobs.outcome(j, job_pod(kube.core, meta.namespace, j["metadata"]["name"]))
        if o.state == JobState.SUCCEEDED and o.result is None:
            o = replace(o, result=result_file(settings, meta.namespace, meta.name, job_gen))
        attempts.append(Attempt(j["metadata"]["name"], job_gen, int(labels.get(comp.LABEL_ATTEMPT, "0")), o))
    return attempts


def store_problem(core: client.CoreV1Api, ft: api.FineTune, namespace: str, settings: Settings) -> str | None:
    """Why the Job's model store cannot be mounted in this namespace, or None. Only claims
    are checked (a hostPath is the node's business)."""
    store = ft.spec.model_store
    claim = store.claim_name if store else settings.store_claim
    if not claim:
        return None
    try:
        core.read_namespaced_persistent_volume_claim(claim, namespace)
        return None
    except ApiException as e:
        if e.status == 404:
            return (f"PersistentVolumeClaim {namespace}/{claim} (the model store) does not exist: create it "
                    "bound to the shared store (docs/deploy.md), or list the namespace in the chart's "
                    "modelStore.share.namespaces")
        if e.status == 403:
            return (f"PersistentVolumeClaim {namespace}/{claim}: the operator may not read claims here "
                    "(RBAC: get persistentvolumeclaims)")
        raise


# ---------------------------------------------------------------- serving


def read_keys(core: client.CoreV1Api, ft: api.FineTune, namespace: str) -> Keys:
    """sha256 digests of the API keys in the FineTune's Secret (every value is a key), or why
    there are none. Read fresh on every reconcile, so an edited Secret rotates the keys."""
    ref = ft.spec.serving.api_key_secret_ref
    if ref is None:
        return Keys(problem="the pool requires API keys: set spec.serving.apiKeySecretRef to a Secret holding them")
    try:
        secret = core.read_namespaced_secret(ref.name, namespace)
    except ApiException as e:
        if e.status in (403, 404):
            what = "not found" if e.status == 404 else "not readable by the operator (RBAC: get secrets)"
            return Keys(problem=f"API key Secret {namespace}/{ref.name} {what}")
        return Keys(error=f"reading Secret {namespace}/{ref.name}: HTTP {e.status}")
    keys = [base64.b64decode(v).decode("utf-8", "replace").strip() for v in (secret.data or {}).values()]
    digests = tuple(sorted({key_digest(k) for k in keys if k}))
    if not digests:
        return Keys(problem=f"API key Secret {namespace}/{ref.name} holds no keys")
    return Keys(digests)


def list_finetunes(custom: client.CustomObjectsApi, settings: Settings) -> list[dict]:
    if not settings.namespaces:
        return custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)["items"]
    items: list[dict] = []
    for ns in settings.namespaces:
        items += custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]
    return items


def fleet_tenants(kube: Kube, settings: Settings, exclude: str | None = None) -> dict[str, sc.Tenant]:
    """Every served FineTune's tenant, from a fresh LIST (their key Secrets read fresh too):
    what the whole serve config is built from. A Secret that cannot be read is a BackendError."""
    tenants: dict[str, sc.Tenant] = {}
    for raw in list_finetunes(kube.custom, settings):
        meta = meta_of(raw)
        if meta.key == exclude or raw["metadata"].get("deletionTimestamp"):
            continue
        try:
            ft = api.FineTune.model_validate(raw)
        except ValidationError:
            continue
        if not eligible(ft, meta.annotations, False):
            continue
        keys = read_keys(kube.core, ft, meta.namespace)
        if keys.error is not None:
            raise BackendError(keys.error)
        mine, _ = tenant(ft, meta.annotations, meta.created, keys, settings)
        if mine is not None:
            tenants[meta.key] = mine
    return tenants


class PoolStatuses:
    """The backend's application statuses, each RUNNING one with a replica's tenant report
    (replica_status.attach_reports), read at most once a second; and the check that the backend
    still holds the applied config, at most once per CONFIG_CHECK_S (a RayService deleted and
    recreated comes back without it; the backend's own upkeep happens in the same read)."""

    def __init__(self, backend: Backend, settings: Settings, monotonic: Callable[[], float] = time.monotonic):
        self.backend, self.settings, self.monotonic = backend, settings, monotonic
        self._cache: tuple[float, dict[str, AppStatus]] | None = None
        self._checked_at: float | None = None

    def get(self) -> dict[str, AppStatus]:
        if self._cache is not None and self.monotonic() - self._cache[0] < STATUS_CACHE_S:
            return self._cache[1]
        statuses = replica_status.attach_reports(self.backend.statuses(), self.settings)
        self._cache = (self.monotonic(), statuses)
        return statuses

    def forget(self) -> None:
        """A new config was applied: the next read asks the backend."""
        self._cache = None

    def still_applied(self, digest: str | None) -> bool:
        now = self.monotonic()
        if self._checked_at is not None and now - self._checked_at < CONFIG_CHECK_S:
            return True
        self._checked_at = now
        return self.backend.recheck() == digest


def pool_view(pools: PoolStatuses, serving: ServingState, key: str, mine: sc.Tenant | None) -> PoolView:
    """This FineTune's pool as the applied config left it: its application read only when the
    FineTune is a tenant of it (a backend that cannot be read: the error, not raised)."""
    seen = PoolView(conflict=serving.conflicts.get(key), digest=serving.digest)
    if mine is None:
        return seen
    try:
        return PoolView(pools.get().get(mine.pool), seen.conflict, seen.digest)
    except BackendError as e:
        return PoolView(error=str(e))

