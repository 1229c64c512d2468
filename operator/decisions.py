"""The reconciler's deciders: pure functions of what was observed and `now`.

observe.py gathers (the FineTune, its Jobs with their pods' outcomes, the backend's
application status), plan.py composes these into one Plan, controller.py applies it. Each
decider returns status fields, one condition and at most one Job to create. No API calls and
no clock in here, so every branch is a table test (tests/operator/test_decisions.py), as in
cert-manager's controllers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from typing import NamedTuple

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator import serveconfig as sc
from deltafleet.operator.backend import DEPLOY_FAILED, RUNNING, AppStatus, ReplicaReport
from deltafleet.operator.conditions import FALSE, TRUE, Reason, iso
from deltafleet.operator.jobs import JobState, Outcome
from deltafleet.operator.settings import Settings

FAILED_APP_STATES = {DEPLOY_FAILED, "UNHEALTHY"}


@dataclass(frozen=True)
class Attempt:
    """One compression Job of the current input, as observed."""

    name: str
    generation: int  # the FineTune generation the Job was made for (its label)
    attempt: int  # 0 for the first try, n for the n-th retry
    outcome: Outcome  # its result already read (termination message, else result.json)


class Ref(NamedTuple):
    """Which FineTune."""

    namespace: str
    name: str


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed compression is tried again."""

    backoff_limit: int  # retries after the first attempt
    base_s: float  # the first backoff; it doubles with each failure ...
    max_s: float  # ... up to this

    @classmethod
    def of(cls, ft: api.FineTune, settings: Settings) -> "RetryPolicy":
        return cls(ft.spec.backoff_limit, settings.retry_base_seconds, settings.retry_max_seconds)


@dataclass(frozen=True)
class Keys:
    """The API key digests of a FineTune's Secret, or why there are none (problem: the spec or
    the Secret; error: the API server answered something else, a temporary failure)."""

    digests: tuple[str, ...] = ()
    problem: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ServedAs:
    """What this FineTune asks of serving: its tenant name when it is eligible (gate passed,
    current input, API keys in hand where the pool needs them), else None, and why not."""

    model: str | None
    pool: str
    endpoint_base: str
    not_served_because: str = "no delta yet"
    keys_problem: str | None = None  # why its API keys are missing, when the pool needs them


@dataclass(frozen=True)
class PoolView:
    """The pool as this operator sees it: its application as the backend reports it (with a
    replica's tenant report once RUNNING), this FineTune's conflict in it, the applied config's
    hash, or why the backend could not be read."""

    app: AppStatus | None = None
    conflict: str | None = None
    digest: str | None = None
    error: str | None = None


@dataclass
class Decision:
    status: str | None  # of the condition this step owns (Compressed or Served); None: leave it
    reason: str
    message: str
    fields: dict = field(default_factory=dict)  # status fields to set
    create: tuple[int, int] | None = None  # (generation, attempt) of the Job to create
    delta: api.DeltaStatus | None = None  # the delta a succeeded attempt brought (also in fields)


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def decide_compression(ref: Ref, attempts: list[Attempt] | tuple[Attempt, ...], generation: int, now: float,
                       retry: RetryPolicy) -> Decision:
    """The Compressed condition while the FineTune has no delta: record a succeeded attempt's
    delta, wait on a running one, back off after a failure, give up after backoff_limit
    retries, or start the next attempt. `attempts` oldest first."""
    for a in attempts:
        if a.outcome.state == JobState.SUCCEEDED and a.outcome.result is not None:
            delta = api.DeltaStatus.from_result(a.outcome.result, generation=a.generation)
            delta.uri = comp.delta_uri(ref.namespace, ref.name, a.generation)
            # The gate decides the condition next.
            return Decision(None, "", "", {"delta": delta.to_k8s(), "job": a.name}, delta=delta)
    failures = [a if a.outcome.state == JobState.FAILED else
                Attempt(a.name, a.generation, a.attempt, Outcome(JobState.FAILED, f"{Reason.RESULT_UNREADABLE}: the Job succeeded "
                        "but neither its termination message nor result.json holds a result", a.outcome.finished_at))
                for a in attempts if a.outcome.state in (JobState.FAILED, JobState.SUCCEEDED)]
    running = [a for a in attempts if a.outcome.state == JobState.RUNNING]
    total = retry.backoff_limit + 1
    fields: dict = {"retries": len(failures)}
    # After a failure the reason stays JobFailedRetrying (waiting or running the retry), so the
    # failure is in the status and gets its Event even when it is noticed after the backoff.
    failed = ""
    if failures:
        last = failures[-1]
        failed = f"attempt {len(failures)} of {total} failed ({last.name}): {last.outcome.reason}"
    if running:
        fields["job"] = running[-1].name
        if running[-1].outcome.waiting:
            msg = f"Job {running[-1].name}'s pod cannot start (attempt {len(failures) + 1} of {total}): {running[-1].outcome.waiting}"
            return Decision(FALSE, Reason.POD_CANNOT_START, msg, fields)
        msg = f"Job {running[-1].name} is compressing (attempt {len(failures) + 1} of {total})"
        if failures:
            return Decision(FALSE, Reason.JOB_FAILED_RETRYING, f"{msg}; {failed}", fields)
        return Decision(FALSE, Reason.JOB_CREATED, msg, fields)
    if failures:
        fields["job"] = failures[-1].name
    if len(failures) >= total:
        last = failures[-1]
        return Decision(FALSE, Reason.BACKOFF_LIMIT_EXCEEDED,
                        f"all {total} attempts failed; last ({last.name}): {last.outcome.reason}", fields)
    if failures:
        due = parse_time(failures[-1].outcome.finished_at) + comp.retry_delay(len(failures), retry.base_s, retry.max_s)
        if now < due:
            when = iso(due)
            return Decision(FALSE, Reason.JOB_FAILED_RETRYING, f"{failed}; next attempt after {when}", fields)
    # The next attempt keeps the generation the first one was made for (a serving-only change
    # since then must not rename the attempts of this input).
    job_gen = attempts[0].generation if attempts else generation
    attempt = attempts[-1].attempt + 1 if attempts else 0
    job = comp.job_name(ref.name, job_gen, attempt)
    fields["job"] = job
    msg = f"created Job {job} (attempt {len(failures) + 1} of {total})"
    if failures:
        return Decision(FALSE, Reason.JOB_FAILED_RETRYING, f"{failed}; {msg}", fields, create=(job_gen, attempt))
    return Decision(FALSE, Reason.JOB_CREATED, msg, fields, create=(job_gen, attempt))


def decide_gate(delta: api.DeltaStatus, min_fidelity: float) -> Decision:
    """The Compressed condition once a delta exists: the quality gate."""
    fid = delta.fidelity.retained_improvement
    figures = f"delta {delta.bytes} bytes ({delta.compression_ratio:.1f}x smaller), retained improvement {fid:.3f}"
    if comp.passes_gate(fid, min_fidelity):
        return Decision(TRUE, Reason.DELTA_READY, figures)
    return Decision(FALSE, Reason.FIDELITY_BELOW_THRESHOLD, f"{figures} is below minFidelity {min_fidelity}: not served")


NOT_SERVED = {"endpoint": None, "replicas": None}


def decide_serving(asks: ServedAs, seen: PoolView) -> Decision:
    """The Served condition: Served=True only when the pool's application runs and (once
    RUNNING) a replica's report has the tenant ready."""
    if seen.error is not None:
        return Decision(FALSE, Reason.BACKEND_UNAVAILABLE, seen.error, NOT_SERVED)
    if asks.keys_problem is not None:
        return Decision(FALSE, Reason.API_KEYS_MISSING, asks.keys_problem, NOT_SERVED)
    if asks.model is None:
        return Decision(FALSE, Reason.WAITING_FOR_DELTA, f"not served: {asks.not_served_because}", NOT_SERVED)
    if seen.conflict is not None:
        return Decision(FALSE, Reason.POOL_BASE_CONFLICT, seen.conflict, NOT_SERVED)
    return _application(asks.model, asks.pool, seen.app, seen.digest, asks.endpoint_base)


def _application(model: str, pool: str, app: AppStatus | None, digest: str | None, endpoint_base: str) -> Decision:
    """Served for an eligible tenant, from its pool's application."""
    if app is not None and app.status == RUNNING and (app.tenants is None or model in app.tenants):
        d = _tenant_on_replica(model, pool, app.replica, f"{endpoint_base}/{pool}/v1")
        return replace(d, message=f"{d.message} ({app.message})") if app.message else d  # e.g. an upgrade in progress
    if app is not None and app.status in FAILED_APP_STATES:
        return Decision(FALSE, Reason.APPLICATION_FAILED, f"application {pool!r} is {app.status}: {app.message.strip()[:500]}")
    state = (app.status if app else "") or "not reported yet"
    said = f" ({app.message})" if app is not None and app.message else ""  # e.g. KubeRay still initializing
    return Decision(FALSE, Reason.CONFIG_APPLIED, f"serve config {digest} applied; application {pool!r}: {state}{said}")


def _tenant_on_replica(model: str, pool: str, report: ReplicaReport | None, endpoint: str) -> Decision:
    """A RUNNING application serves the tenant only once its delta has loaded on a replica
    (by traffic or the pool's load check): one that cannot be loaded would answer 503."""
    if report is None or report.tenants is None:
        why = report.error if report is not None else "not read yet"
        return Decision(FALSE, Reason.REPLICA_STATUS_UNAVAILABLE,
                        f"application {pool!r} is RUNNING but its replicas' tenant states cannot be read: {why}")
    t = report.tenants.get(model)
    if t is None:
        return Decision(FALSE, Reason.TENANT_LOADING, f"application {pool!r} is RUNNING; it has not taken "
                        f"model {model!r} yet (the config update is on its way)")
    held = {"replicas": t.replicas}
    if t.state == "ready":
        return Decision(TRUE, Reason.APPLICATION_RUNNING, f"model {model!r} served by application {pool!r} at {endpoint} "
                        f"(held by {t.replicas} of {report.replicas} replicas now)", {"endpoint": endpoint, **held})
    if t.state == "failed":
        return Decision(FALSE, Reason.TENANT_LOAD_FAILED,
                        f"model {model!r} failed to load in application {pool!r}: {t.error.strip()[:700]}", held)
    return Decision(FALSE, Reason.TENANT_LOADING, f"model {model!r} is loading in application {pool!r}", held)


# ---------------------------------------------------------------- the tenant


def eligible(ft: api.FineTune, annotations: dict, deleting: bool) -> bool:
    """A FineTune is served iff its delta is of the current compression input and passed the gate."""
    d = ft.status.delta
    return (
        not deleting
        and d is not None
        and annotations.get(comp.HASH_ANNOTATION) == comp.compression_hash(ft.spec)
        and comp.passes_gate(d.fidelity.retained_improvement, ft.spec.compression.min_fidelity)
    )


def tenant(ft: api.FineTune, annotations: dict, created: str, keys: Keys,
           settings: Settings) -> tuple[sc.Tenant | None, str | None]:
    """The tenant this FineTune adds to its pool, or None; and, when the pool needs API keys
    it has not got, why. `keys` must have no error (the caller reports it)."""
    if not eligible(ft, annotations, False):
        return None, None
    if keys.problem is not None and settings.serve_auth == "keys":
        return None, keys.problem
    return sc.tenant_of(ft, created, settings, keys.digests), None
