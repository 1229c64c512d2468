"""The reconciler: one FineTune at a time, from its spec and its Jobs to its status.

Every trigger (create, resume, spec update, a Job finishing, the periodic resync) calls
`Controller.reconcile(namespace, name)`, which reads the object fresh, decides, and writes
status itself under a per-object lock, so concurrent triggers never interleave writes.
The serve config is rebuilt from a fresh LIST of FineTunes whenever this FineTune's
contribution differs from what was applied last, and applied only when its hash changes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deltafleet.compress.result import RESULT_FILE, CompressResult
from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator import conditions as cond
from deltafleet.operator import jobs, metrics, replica_status
from deltafleet.operator import serveconfig as sc
from deltafleet.operator.backend import AppStatus, Backend, BackendError
from deltafleet.operator.conditions import COMPRESSED, FALSE, SERVED, Reason
from deltafleet.operator.decisions import Attempt, decide_compression, decide_gate, decide_serving
from deltafleet.operator.settings import Settings
from deltafleet.operator.validation import policy_problems, spec_problems
from deltafleet.serving.config import key_digest

log = logging.getLogger("deltafleet.operator")
_PER_INPUT = ("delta", "job", "retries", "endpoint")  # status that describes one compression input


class InvalidSpec(Exception):
    """The spec passed the schema but cannot be run; recorded as a condition, never retried."""


class PolicyRefused(InvalidSpec):
    """The spec asks what the admin's policy forbids; recorded as a condition, never retried."""


@dataclass
class ServingState:
    """What this process last applied: the tenants (by FineTune) and the config hash."""

    tenants: dict[str, sc.Tenant] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)
    digest: str | None = None
    synced: bool = False


def eligible(ft: api.FineTune, annotations: dict, deleting: bool) -> bool:
    """A FineTune is served iff its delta is of the current compression input and passed the gate."""
    d = ft.status.delta
    return (
        not deleting
        and d is not None
        and annotations.get(comp.HASH_ANNOTATION) == comp.compression_hash(ft.spec)
        and comp.passes_gate(d.fidelity.retained_improvement, ft.spec.compression.min_fidelity)
    )


# How often a reconcile checks that the backend still holds the applied serve config.
CONFIG_CHECK_S = 10.0


class Controller:
    def __init__(self, settings: Settings, backend: Backend, api_client: client.ApiClient | None = None):
        self.settings = settings
        self.backend = backend
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._serving_lock = threading.Lock()
        self.serving = ServingState()
        self._status_cache: tuple[float, dict[str, AppStatus]] = (0.0, {})
        self._config_checked_at = 0.0
        self._phases: dict[str, str] = {}  # each FineTune's last written phase, for the metric

    # ------------------------------------------------------------ API helpers

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _get(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _list_finetunes(self) -> list[dict]:
        if not self.settings.namespaces:
            return self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)["items"]
        items: list[dict] = []
        for ns in self.settings.namespaces:
            items += self.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]
        return items

    def _jobs(self, raw: dict, digest: str) -> list[dict]:
        """This FineTune's Jobs for this compression input, oldest attempt first (owned by this
        very object: a recreated FineTune of the same name never sees its predecessor's)."""
        meta = raw["metadata"]
        selector = f"{comp.LABEL_FINETUNE}={meta['name']},{comp.LABEL_HASH}={digest}"
        items = _json(self.batch.list_namespaced_job(meta["namespace"], label_selector=selector, _preload_content=False))["items"]
        owned = [j for j in items if any(o.get("uid") == meta["uid"] for o in j["metadata"].get("ownerReferences") or [])]
        return sorted(owned, key=lambda j: int(j["metadata"]["labels"].get(comp.LABEL_ATTEMPT, "0")))

    def _pod(self, namespace: str, job_name: str) -> dict | None:
        """The Job's (only: restartPolicy Never, backoffLimit 0) pod, newest if there are more."""
        selector = f"batch.kubernetes.io/job-name={job_name}"
        items = _json(self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))["items"]
        return sorted(items, key=lambda p: p["metadata"].get("creationTimestamp", ""))[-1] if items else None

    def _create_job(self, raw: dict, manifest: dict) -> None:
        kopf.adopt(manifest, owner=raw)
        try:
            self.batch.create_namespaced_job(raw["metadata"]["namespace"], manifest)
            log.info("created Job %s/%s", raw["metadata"]["namespace"], manifest["metadata"]["name"])
        except ApiException as e:
            if e.status != 409:  # 409: it exists (an earlier incarnation made it) -- that is success
                raise
        if self.settings.exit_after_job_create:
            log.warning("exit_after_job_create: exiting right after creating %s", manifest["metadata"]["name"])
            os._exit(3)

    # ------------------------------------------------------------ compression

    def _compression(self, raw: dict, ft: api.FineTune, digest: str, status: dict, conds: list, gen: int) -> list:
        """Gather this input's attempts, decide (decisions.decide_compression), write: create
        the Job it asks for; returns the new conditions (status dict updated in place)."""
        meta = raw["metadata"]
        attempts = []
        for j in self._jobs(raw, digest):
            labels = j["metadata"]["labels"]
            job_gen = int(labels[comp.LABEL_GENERATION])
            o = jobs.outcome(j, self._pod(meta["namespace"], j["metadata"]["name"]))
            if o.state == jobs.SUCCEEDED and o.result is None:
                o = replace(o, result=self._result_file(meta["namespace"], meta["name"], job_gen))
            attempts.append(Attempt(j["metadata"]["name"], job_gen, int(labels.get(comp.LABEL_ATTEMPT, "0")), o))
        d = decide_compression(meta["namespace"], meta["name"], attempts, ft.spec.backoff_limit, gen, time.time(),
                               self.settings.retry_base_seconds, self.settings.retry_max_seconds)
        if d.create is not None and (missing := self._store_missing(ft, meta["namespace"])):
            # No Job that could only fail to mount: it would sit Pending until its deadline.
            return cond.set_condition(conds, COMPRESSED, FALSE, Reason.MODEL_STORE_MISSING, missing, gen)[0]
        if d.create is not None:
            self._create_job(raw, jobs.build_job(ft, digest, *d.create, self.settings))
            metrics.JOBS.labels("created").inc()
        if "delta" in d.fields:
            metrics.JOBS.labels("succeeded").inc()
        newly_failed = d.fields.get("retries", 0) - ((raw.get("status") or {}).get("retries") or 0)
        if newly_failed > 0:
            metrics.JOBS.labels("failed").inc(newly_failed)
        status.update(d.fields)
        if d.status is None:
            return conds
        return cond.set_condition(conds, COMPRESSED, d.status, d.reason, d.message, gen)[0]

    def _store_missing(self, ft: api.FineTune, namespace: str) -> str | None:
        """Why the Job's model store cannot be mounted in this namespace, or None. Only claims
        are checked (a hostPath is the node's business)."""
        store = ft.spec.model_store
        claim = store.claim_name if store else self.settings.store_claim
        if not claim:
            return None
        try:
            self.core.read_namespaced_persistent_volume_claim(claim, namespace)
            return None
        except ApiException as e:
            if e.status == 404:
                return (f"PersistentVolumeClaim {namespace}/{claim} (the model store) does not exist: create it "
                        "bound to the shared store (docs/deploy.md), or list the namespace in the chart's modelStore.share.namespaces")
            if e.status == 403:
                return f"PersistentVolumeClaim {namespace}/{claim}: the operator may not read claims here (RBAC: get persistentvolumeclaims)"
            raise

    def _result_file(self, namespace: str, name: str, generation: int) -> CompressResult | None:
        """Fallback when the termination message is missing: result.json on the store, if this
        process has the (default) store mounted."""
        if not Path(self.settings.operator_store_path or "/nonexistent").is_dir():
            return None
        path = Path(comp.output_dir(namespace, name, generation, root=self.settings.operator_store_path)) / RESULT_FILE
        try:
            return CompressResult.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            return None

    # ------------------------------------------------------------ serving

    def _config_still_applied(self) -> bool:
        """Whether the backend still holds the config this operator applied: a RayService deleted
        and recreated (KubeRay's own recovery step, or a person) comes back without it and would
        otherwise be re-applied only when some FineTune changed. At most one read per
        CONFIG_CHECK_S, whatever the number of FineTunes; the backend's own upkeep (rayservice:
        the RayClusters' worker bounds) happens in the same read."""
        now = time.monotonic()
        if now - self._config_checked_at < CONFIG_CHECK_S:
            return True
        self._config_checked_at = now
        return self.backend.recheck() == self.serving.digest

    def _statuses(self) -> dict[str, AppStatus]:
        at, cached = self._status_cache
        if time.monotonic() - at < 1.0:
            return cached
        # RUNNING applications come with a replica's tenant states (its -/tenants route).
        statuses = replica_status.attach_reports(self.backend.statuses(), self.settings)
        self._status_cache = (time.monotonic(), statuses)
        return statuses

    def sync_serving(self, exclude: str | None = None) -> None:
        """Build the whole serve config from a fresh LIST and apply it if its hash changed."""
        with self._serving_lock:
            tenants: dict[str, sc.Tenant] = {}
            for raw in self._list_finetunes():
                meta = raw["metadata"]
                key = f"{meta['namespace']}/{meta['name']}"
                if key == exclude:
                    continue
                try:
                    ft = api.FineTune.model_validate(raw)
                except ValidationError:
                    continue
                if meta.get("deletionTimestamp"):
                    continue
                tenant, _ = self._tenant(raw, ft)
                if tenant is not None:
                    tenants[key] = tenant
            config = replica_status.with_status_key(sc.build_serve_config(list(tenants.values()), self.settings),
                                                    replica_status.status_key(self.settings))
            digest = sc.config_hash(config)
            if digest != self.backend.applied_hash():
                self.backend.apply(config, digest)
                metrics.APPLIES.inc()
                self._status_cache = (0.0, {})
                log.info("applied serve config %s: %d pool(s), %d tenant(s)", digest, len(config["applications"]), len(tenants))
            _, conflicts = sc.split_pools(list(tenants.values()))
            self.serving = ServingState(tenants, conflicts, digest, True)

    def _serving(self, raw: dict, ft: api.FineTune, status: dict, conds: list, gen: int) -> list:
        """Gather (sync the serve config if this tenant changed, the pool's status), decide, write."""
        meta = raw["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        status["pool"], status["modelName"] = ft.pool(), ft.model_name()
        app, error, keys_problem, mine = None, None, None, None
        try:
            mine, keys_problem = self._tenant(raw, ft)
            if not self.serving.synced or self.serving.tenants.get(key) != mine or not self._config_still_applied():
                self.sync_serving()
            app = self._statuses().get(mine.pool) if mine is not None else None
        except BackendError as e:  # recorded, not raised: the compression status must still be written
            error = str(e)
        why = (cond.get_condition(conds, COMPRESSED) or {}).get("message", "no delta yet")
        d = decide_serving(mine.model if mine else None, ft.pool(), self.serving.conflicts.get(key), app, error,
                           self.serving.digest, self.settings.endpoint_base, why, keys_problem)
        status.update(d.fields)
        return cond.set_condition(conds, SERVED, d.status, d.reason, d.message, gen)[0]

    def _tenant(self, raw: dict, ft: api.FineTune) -> tuple[sc.Tenant | None, str | None]:
        """The tenant this FineTune adds to its pool, or None; and, when the pool needs API keys
        it has not got, why. Reads its key Secret fresh, so an edited Secret rotates the keys."""
        meta = raw["metadata"]
        if not eligible(ft, meta.get("annotations") or {}, False):
            return None, None
        digests, problem = self._key_digests(ft, meta["namespace"])
        if problem is not None and self.settings.serve_auth == "keys":
            return None, problem
        return sc.tenant_of(ft, meta.get("creationTimestamp", ""), self.settings, digests), None

    def _key_digests(self, ft: api.FineTune, namespace: str) -> tuple[tuple[str, ...], str | None]:
        """sha256 digests of the API keys in the FineTune's Secret (every value is a key), or why there are none."""
        ref = ft.spec.serving.api_key_secret_ref
        if ref is None:
            return (), "the pool requires API keys: set spec.serving.apiKeySecretRef to a Secret holding them"
        try:
            secret = self.core.read_namespaced_secret(ref.name, namespace)
        except ApiException as e:
            if e.status in (403, 404):
                what = "not found" if e.status == 404 else "not readable by the operator (RBAC: get secrets)"
                return (), f"API key Secret {namespace}/{ref.name} {what}"
            raise BackendError(f"reading Secret {namespace}/{ref.name}: HTTP {e.status}") from None
        keys = [base64.b64decode(v).decode("utf-8", "replace").strip() for v in (secret.data or {}).values()]
        digests = tuple(sorted({key_digest(k) for k in keys if k}))
        if not digests:
            return (), f"API key Secret {namespace}/{ref.name} holds no keys"
        return digests, None

    # ------------------------------------------------------------ the reconcile

    def reconcile(self, namespace: str, name: str) -> None:
        with self._lock(f"{namespace}/{name}"):
            raw = self._get(namespace, name)
            if raw is None or raw["metadata"].get("deletionTimestamp"):
                return
            self._reconcile(raw)

    def _reconcile(self, raw: dict) -> None:
        meta = raw["metadata"]
        namespace, name, gen = meta["namespace"], meta["name"], meta.get("generation", 1)
        reason = Reason.INVALID_SPEC
        try:
            ft = api.FineTune.model_validate(raw)
            problems = spec_problems(ft, self.settings)
            if not problems and (problems := policy_problems(ft, self.settings)):
                reason = Reason.REFUSED_BY_POLICY
        except ValidationError as e:
            err = e.errors()[0]
            problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"]
        if problems:  # before any Job: nothing runs that the schema, the code or the policy refuses
            conds = (raw.get("status") or {}).get("conditions") or []
            conds = cond.set_condition(conds, COMPRESSED, FALSE, reason, "; ".join(problems), gen)[0]
            conds = cond.set_condition(conds, SERVED, FALSE, Reason.WAITING_FOR_DELTA, "the spec cannot be compressed", gen)[0]
            self._write(raw, dict(raw.get("status") or {}), conds, gen)
            raise (PolicyRefused if reason == Reason.REFUSED_BY_POLICY else InvalidSpec)("; ".join(problems))

        digest = comp.compression_hash(ft.spec)
        if (meta.get("annotations") or {}).get(comp.HASH_ANNOTATION) != digest:
            # A new compression input: forget the old delta FIRST (status), then record the
            # new hash (annotation); a crash in between only repeats this step.
            old = raw.get("status") or {}
            if any(old.get(k) is not None for k in _PER_INPUT):
                self._patch_status(raw, {k: None for k in _PER_INPUT})
            self.custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"metadata": {"annotations": {comp.HASH_ANNOTATION: digest}}}
            )
            raw = self._get(namespace, name)
            if raw is None or raw["metadata"].get("deletionTimestamp"):
                return
            ft = api.FineTune.model_validate(raw)

        status = json.loads(json.dumps(raw.get("status") or {}))
        conds = status.get("conditions") or []
        if ft.status.delta is None:
            conds = self._compression(raw, ft, digest, status, conds, gen)
            if status.get("delta"):
                # Record the delta before any serve config names it.
                self._patch_status(raw, {"delta": status["delta"], "job": status.get("job"), "retries": status.get("retries")})
                raw = {**raw, "status": {**(raw.get("status") or {}), "delta": status["delta"]}}
                ft = api.FineTune.model_validate(raw)
        if ft.status.delta is not None:
            gate = decide_gate(ft.status.delta, ft.spec.compression.min_fidelity)
            conds = cond.set_condition(conds, COMPRESSED, gate.status, gate.reason, gate.message, gen)[0]
        conds = self._serving(raw, ft, status, conds, gen)
        self._write(raw, status, conds, gen)

    # ------------------------------------------------------------ writing status

    def _patch_status(self, raw: dict, status: dict) -> None:
        meta = raw["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, meta["namespace"], api.PLURAL, meta["name"], {"status": status}
        )

    def _write(self, raw: dict, status: dict, conds: list, gen: int) -> None:
        """Ready and phase from the conditions; one status patch if anything changed; an Event
        per condition transition."""
        old_status = raw.get("status") or {}
        conds, _ = cond.reduce_ready(conds, gen)
        status["conditions"] = conds
        status["phase"] = cond.reduce_phase(conds)
        with self._locks_guard:
            self._phases[f"{raw['metadata']['namespace']}/{raw['metadata']['name']}"] = status["phase"]
            metrics.count_phases(list(self._phases.values()))
        status["observedGeneration"] = gen
        transitions = cond.transitions(old_status.get("conditions") or [], conds)
        if _strip_none(status) != _strip_none(old_status):
            self._patch_status(raw, status)
        for t in transitions:
            kopf.event(raw, type=t.event_type, reason=t.reason, message=f"{t.type}={t.status}: {t.message}")

    # ------------------------------------------------------------ deletion

    def finalize(self, raw: dict) -> None:
        """Take the tenant out of its pool, then (deletionPolicy Delete) its delta files."""
        meta = raw["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        with self._lock(key):
            self.sync_serving(exclude=key)
            with self._locks_guard:
                self._phases.pop(key, None)
                metrics.count_phases(list(self._phases.values()))
            policy = (raw.get("spec") or {}).get("deletionPolicy", api.DeletionPolicy.Delete.value)
            store = (raw.get("spec") or {}).get("modelStore")
            mounted = bool(self.settings.operator_store_path) and Path(self.settings.operator_store_path).is_dir()
            if policy == api.DeletionPolicy.Delete.value and not store and mounted:
                if comp.delete_deltas(meta["namespace"], meta["name"], self.settings.operator_store_path):
                    log.info("deleted the deltas of %s", key)
            elif policy == api.DeletionPolicy.Delete.value:
                log.warning("%s: deletionPolicy Delete but this operator has no access to its store; files kept", key)


def _strip_none(d):
    if isinstance(d, dict):
        return {k: _strip_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_strip_none(v) for v in d]
    return d


def _json(response) -> dict:
    """A raw API response as the API's own JSON (camelCase), not the typed client's snake_case."""
    return json.loads(response.data)
