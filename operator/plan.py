"""The reconciler's plan: `decide(observed, settings, now)`, one pure function from what was
observed (observe.py) to everything the controller writes, in the order it writes it.

It composes the deciders of decisions.py (compression, the quality gate, serving) over the
one Observed value: no API calls, no clock. controller.apply carries the Plan out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import kopf

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator import conditions as cond
from deltafleet.operator import jobs
from deltafleet.operator import serveconfig as sc
from deltafleet.operator.conditions import COMPRESSED, FALSE, SERVED, Reason, Transition
from deltafleet.operator.decisions import (Decision, PoolView, Ref, RetryPolicy, ServedAs, decide_compression,
                                           decide_gate, decide_serving, eligible, tenant)
from deltafleet.operator.observe import Meta, Observed
from deltafleet.operator.settings import Settings

PER_INPUT = ("delta", "job", "retries", "endpoint", "replicas")  # status that describes one compression input


@dataclass(frozen=True)
class ServingPlan:
    """This FineTune's part in its pool's serve config."""

    tenant: sc.Tenant | None  # what it contributes (None: nothing)
    sync: bool  # the contribution differs from what this process applied last, or nothing was applied yet
    asks: ServedAs  # what Served is decided from, again after a sync
    error: str | None = None  # its API key Secret could not be read: no sync, Served says why


@dataclass(frozen=True)
class Plan:
    """What one reconcile writes, field by field in the order controller.apply writes it."""

    meta: Meta
    at: str  # `now` as a condition time
    compressed: list  # the conditions with Compressed decided (Served and Ready follow from the serving step)
    fields: dict  # the status fields besides conditions, phase and observedGeneration
    baseline: dict  # the status as the server holds it before step 6 (after steps 1 and 4)
    forget: dict | None = None  # 1. a new compression input: the old input's status to clear ...
    annotate: str | None = None  # 2. ... before its hash is recorded (annotation)
    job: dict | None = None  # 3. the Job to create (owned by the FineTune)
    record: dict | None = None  # 4. the new delta, recorded before any serve config names it
    serving: ServingPlan | None = None  # 5. the serve config (None: a refused spec takes no part)
    status: dict = field(default_factory=dict)  # 6. the whole status ...
    events: tuple[Transition, ...] = ()  # ... and an Event per condition transition
    refusal: str | None = None  # the spec is refused (why): the reconcile fails for good after step 6
    refused_by_policy: bool = False
    succeeded: bool = False  # metrics: an attempt brought a delta ...
    newly_failed: int = 0  # ... or this many more failed

    @property
    def write(self) -> bool:
        """Whether step 6 writes: only when something changed."""
        return strip_none(self.status) != strip_none(self.baseline)

    def served_by(self, seen: PoolView) -> "Plan":
        """The plan with Served (and Ready, phase) decided from the pool as `seen`."""
        served = decide_serving(self.serving.asks, seen)
        conds = cond.set_condition(self.compressed, SERVED, served.status, served.reason, served.message,
                                   self.meta.generation, self.at)[0]
        return _finish(self, {**self.fields, **served.fields}, conds)


def decide(observed: Observed, settings: Settings, now: float) -> Plan:
    """Everything this reconcile writes, from what it observed."""
    at = cond.iso(now)
    if observed.problems:
        return _refused(observed, at)
    baseline, ft, forget = _new_input(observed)
    plan = Plan(observed.meta, at, baseline.get("conditions") or [], copy.deepcopy(baseline), baseline,
                forget=forget, annotate=None if observed.hash_current else observed.digest)
    if ft.status.delta is None:
        plan, ft = _compression(plan, observed, ft, settings, now)
    if ft.status.delta is not None:
        gate = decide_gate(ft.status.delta, ft.spec.compression.min_fidelity)
        compressed = cond.set_condition(plan.compressed, COMPRESSED, gate.status, gate.reason, gate.message,
                                        observed.meta.generation, at)[0]
        plan = replace(plan, compressed=compressed)
    serving = _serving(observed, ft, plan.compressed, settings)
    plan = replace(plan, serving=serving, fields={**plan.fields, "pool": ft.pool(), "modelName": ft.model_name()})
    return plan.served_by(PoolView(error=serving.error) if serving.error is not None else observed.pool)


def _refused(observed: Observed, at: str) -> Plan:
    """A spec the schema, the code or the policy refuses: both conditions say so, nothing runs."""
    gen, problems = observed.meta.generation, "; ".join(observed.problems)
    reason = Reason.REFUSED_BY_POLICY if observed.refused_by_policy else Reason.INVALID_SPEC
    conds = observed.status.get("conditions") or []
    conds = cond.set_condition(conds, COMPRESSED, FALSE, reason, problems, gen, at)[0]
    why = "the spec cannot be compressed"
    conds = cond.set_condition(conds, SERVED, FALSE, Reason.WAITING_FOR_DELTA, why, gen, at)[0]
    plan = Plan(observed.meta, at, conds, dict(observed.status), observed.status, refusal=problems,
                refused_by_policy=observed.refused_by_policy)
    return _finish(plan, plan.fields, conds)


def _new_input(observed: Observed) -> tuple[dict, api.FineTune, dict | None]:
    """A compression input whose hash the annotation does not record yet: its status starts
    without the old input's fields. Returns (the status after that, the FineTune as it, what to clear)."""
    if observed.hash_current:
        return observed.status, observed.ft, None
    old = observed.status
    forget = {k: None for k in PER_INPUT} if any(old.get(k) is not None for k in PER_INPUT) else None
    baseline = {k: v for k, v in old.items() if k not in PER_INPUT}
    status = observed.ft.status.model_copy(update=dict.fromkeys(PER_INPUT))
    return baseline, observed.ft.model_copy(update={"status": status}), forget


def _compression(plan: Plan, observed: Observed, ft: api.FineTune, settings: Settings,
                 now: float) -> tuple[Plan, api.FineTune]:
    """No delta yet: record what an attempt brought, wait, back off, or create the next Job."""
    meta = observed.meta
    retry = RetryPolicy.of(ft, settings)
    d = decide_compression(Ref(meta.namespace, meta.name), observed.attempts, meta.generation, now, retry)
    if d.create is not None and observed.store_problem is not None:
        # No Job that could only fail to mount: it would sit Pending until its deadline.
        missing = _set(plan, COMPRESSED, FALSE, Reason.MODEL_STORE_MISSING, observed.store_problem)
        return replace(plan, compressed=missing), ft
    fields = {**plan.fields, **d.fields}
    plan = replace(plan, fields=fields, succeeded=d.delta is not None,
                   newly_failed=max(0, d.fields.get("retries", 0) - (plan.baseline.get("retries") or 0)))
    if d.create is not None:
        plan = replace(plan, job=_job(ft, observed, d, settings))
    if d.status is not None:
        plan = replace(plan, compressed=_set(plan, COMPRESSED, d.status, d.reason, d.message))
    if d.delta is None:
        return plan, ft
    record = {"delta": fields["delta"], "job": fields.get("job"), "retries": fields.get("retries")}
    plan = replace(plan, record=record, baseline={**plan.baseline, **record})
    return plan, ft.model_copy(update={"status": ft.status.model_copy(update={"delta": d.delta})})


def _job(ft: api.FineTune, observed: Observed, d: Decision, settings: Settings) -> dict:
    manifest = jobs.build_job(ft, observed.digest, *d.create, settings)
    kopf.adopt(manifest, owner=observed.meta.body())
    return manifest


def _serving(observed: Observed, ft: api.FineTune, compressed: list, settings: Settings) -> ServingPlan:
    """This FineTune's tenant (with its API keys) and whether the serve config must be rebuilt."""
    why = (cond.get_condition(compressed, COMPRESSED) or {}).get("message", "no delta yet")
    annotations = {**observed.meta.annotations, comp.HASH_ANNOTATION: observed.digest}  # as step 2 leaves them
    if eligible(ft, annotations, False) and observed.keys.error is not None:
        return ServingPlan(None, False, ServedAs(None, ft.pool(), settings.endpoint_base, why), observed.keys.error)
    mine, keys_problem = tenant(ft, annotations, observed.meta.created, observed.keys, settings)
    asks = ServedAs(mine.model if mine else None, ft.pool(), settings.endpoint_base, why, keys_problem)
    return ServingPlan(mine, not observed.synced or observed.applied != mine, asks)


def _set(plan: Plan, type_: str, status: str, reason: str, message: str) -> list:
    return cond.set_condition(plan.compressed, type_, status, reason, message, plan.meta.generation, plan.at)[0]


def _finish(plan: Plan, fields: dict, conds: list) -> Plan:
    """Ready and phase from the conditions, observedGeneration, and the transitions."""
    conds, _ = cond.reduce_ready(conds, plan.meta.generation, plan.at)
    status = {**fields, "conditions": conds, "phase": cond.reduce_phase(conds),
              "observedGeneration": plan.meta.generation}
    events = tuple(cond.transitions(plan.baseline.get("conditions") or [], conds))
    return replace(plan, status=status, events=events)


def strip_none(d):
    if isinstance(d, dict):
        return {k: strip_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [strip_none(v) for v in d]
    return d
