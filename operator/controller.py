"""The reconciler: one FineTune at a time, from its spec and its Jobs to its status.

Every trigger (create, resume, spec update, a Job finishing, the periodic resync) calls
`Controller.reconcile(namespace, name)`, which, under a per-object lock, reads the object
fresh, gathers everything else once (observe.gather -> Observed), decides (plan.decide ->
Plan, pure) and applies the Plan in numbered steps, in the order that survives a crash at
any point (`Controller.apply`), as KubeRay's Reconcile reads. The serve config is rebuilt from
a fresh LIST of FineTunes whenever this FineTune's contribution differs from what was applied
last (or the backend lost it), and applied only when its hash changes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator import metrics, observe, replica_status
from deltafleet.operator import serveconfig as sc
from deltafleet.operator.backend import Backend, BackendError
from deltafleet.operator.decisions import PoolView
from deltafleet.operator.observe import ServingState
from deltafleet.operator.plan import Plan, decide
from deltafleet.operator.settings import Settings

log = logging.getLogger("deltafleet.operator")


class InvalidSpec(Exception):
    """The spec passed the schema but cannot be run; recorded as a condition, never retried."""


class PolicyRefused(InvalidSpec):
    """The spec asks what the admin's policy forbids; recorded as a condition, never retried."""


class Controller:
    def __init__(self, settings: Settings, backend: Backend, api_client: client.ApiClient | None = None, *,
                 kube: observe.Kube | None = None, clock: Callable[[], float] | None = None,
                 post_event: Callable[..., None] = kopf.event):
        self.settings = settings
        self.backend = backend
        self.kube = kube or observe.Kube.connect(api_client)
        self.clock = clock or observe.wall_clock  # seconds since the epoch: the `now` of every decision
        self.post_event = post_event  # kopf.event: an Event on the FineTune (a test records them)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._serving_lock = threading.Lock()
        self.serving = ServingState()
        self.pools = observe.PoolStatuses(backend, settings)
        self._phases: dict[str, str] = {}  # each FineTune's last written phase, for the metric

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # ------------------------------------------------------------ the reconcile

    def reconcile(self, namespace: str, name: str) -> None:
        """Observe -> decide -> apply, under this FineTune's lock."""
        with self._lock(f"{namespace}/{name}"):
            raw = observe.read(self.kube.custom, namespace, name)
            if raw is None or raw["metadata"].get("deletionTimestamp"):
                return
            now = self.clock()
            observed = observe.gather(raw, kube=self.kube, pools=self.pools, serving=self.serving,
                                      settings=self.settings, now=now)
            self.apply(decide(observed, self.settings, now))

    def apply(self, plan: Plan) -> None:
        """Write the plan, in this order (a crash between two steps only repeats steps next time):
        1. a new compression input: forget the old input's delta (status) ...
        2. ... then record the new hash (annotation); the FineTune gone or deleting: stop;
        3. create the Job (it exists, 409: success; exit_after_job_create: exit here);
        4. record a new delta (status) before any serve config names it;
        5. the serve config: rebuilt when this tenant's contribution changed or the backend no
           longer holds it, then Served decided from the pool as the rebuild left it;
        6. one status write, only if anything changed, and an Event per condition transition;
        7. a refused spec: fail for good (the handler stops retrying)."""
        if plan.forget is not None:
            self._patch_status(plan, plan.forget)  # 1
        if plan.annotate is not None and not self._annotate(plan):  # 2
            return
        if plan.job is not None:
            self._create_job(plan)  # 3
        if plan.record is not None:
            self._patch_status(plan, plan.record)  # 4
        plan = self._serve(plan)  # 5
        self._write(plan)  # 6
        if plan.refusal is not None:  # 7
            raise (PolicyRefused if plan.refused_by_policy else InvalidSpec)(plan.refusal)

    # ------------------------------------------------------------ the steps

    def _patch_status(self, plan: Plan, status: dict) -> None:
        m = plan.meta
        self.kube.custom.patch_namespaced_custom_object_status(api.GROUP, api.VERSION, m.namespace, api.PLURAL, m.name,
                                                               {"status": status})

    def _annotate(self, plan: Plan) -> bool:
        """Record the compression input's hash; False when the FineTune is gone or being deleted."""
        m = plan.meta
        try:
            patch = {"metadata": {"annotations": {comp.HASH_ANNOTATION: plan.annotate}}}
            after = self.kube.custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, m.namespace, api.PLURAL,
                                                                    m.name, patch)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return not ((after or {}).get("metadata") or {}).get("deletionTimestamp")

    def _create_job(self, plan: Plan) -> None:
        name = plan.job["metadata"]["name"]
        try:
            self.kube.batch.create_namespaced_job(plan.meta.namespace, plan.job)
            log.info("created Job %s/%s", plan.meta.namespace, name)
        except ApiException as e:
            if e.status != 409:  # 409: it exists (an earlier incarnation made it) -- that is success
                raise
        metrics.JOBS.labels("created").inc()
        if self.settings.exit_after_job_create:
            log.warning("exit_after_job_create: exiting right after creating %s", name)
            os._exit(3)

    def _serve(self, plan: Plan) -> Plan:
        """Step 5: sync the serve config if this tenant changed it (or the backend lost it), then
        decide Served again from the pool as the sync left it. A backend error is recorded, not
        raised: the status must still be written."""
        sp = plan.serving
        if sp is None or sp.error is not None:
            return plan
        try:
            if not sp.sync and self.pools.still_applied(self.serving.digest):
                return plan
            self.sync_serving()
            return plan.served_by(observe.pool_view(self.pools, self.serving, plan.meta.key, sp.tenant))
        except BackendError as e:
            return plan.served_by(PoolView(error=str(e)))

    def _write(self, plan: Plan) -> None:
        """Step 6: one status patch if anything changed; an Event per condition transition."""
        with self._locks_guard:
            self._phases[plan.meta.key] = plan.status["phase"]
            metrics.count_phases(list(self._phases.values()))
        if plan.succeeded:
            metrics.JOBS.labels("succeeded").inc()
        if plan.newly_failed > 0:
            metrics.JOBS.labels("failed").inc(plan.newly_failed)
        if plan.write:
            self._patch_status(plan, plan.status)
        body = plan.meta.body()
        for t in plan.events:
            self.post_event(body, type=t.event_type, reason=t.reason, message=f"{t.type}={t.status}: {t.message}")

    # ------------------------------------------------------------ the serve config

    def sync_serving(self, exclude: str | None = None) -> None:
        """Build the whole serve config from a fresh LIST and apply it if its hash changed."""
        with self._serving_lock:
            tenants = observe.fleet_tenants(self.kube, self.settings, exclude)
            config = replica_status.with_status_key(sc.build_serve_config(list(tenants.values()), self.settings),
                                                    replica_status.status_key(self.settings))
            digest = sc.config_hash(config)
            if digest != self.backend.applied_hash():
                self.backend.apply(config, digest)
                metrics.APPLIES.inc()
                self.pools.forget()
                log.info("applied serve config %s: %d pool(s), %d tenant(s)", digest, len(config["applications"]),
                         len(tenants))
            _, conflicts = sc.split_pools(list(tenants.values()))
            self.serving = ServingState(tenants, conflicts, digest, True)

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

