"""The reconciler's decisions: pure functions of what was observed and `now`.

controller.py gathers (the FineTune, its Jobs with their pods' outcomes, the backend's
application status), calls these, and writes what they return: status fields, one
condition, and at most one Job to create. No API calls and no clock in here, so every
branch is a table test (tests/operator/test_decisions.py), as in cert-manager's controllers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator import jobs
from deltafleet.operator.backend import DEPLOY_FAILED, RUNNING, AppStatus, ReplicaReport
from deltafleet.operator.conditions import FALSE, TRUE, Reason

FAILED_APP_STATES = {DEPLOY_FAILED, "UNHEALTHY"}


@dataclass(frozen=True)
class Attempt:
    """One compression Job of the current input, as observed."""

    name: str
    generation: int  # the FineTune generation the Job was made for (its label)
    attempt: int  # 0 for the first try, n for the n-th retry
    outcome: jobs.Outcome  # its result already read (termination message, else result.json)


@dataclass
class Decision:
    status: str | None  # of the condition this step owns (Compressed or Served); None: leave it
    reason: str
    message: str
    fields: dict = field(default_factory=dict)  # status fields to set
    create: tuple[int, int] | None = None  # (generation, attempt) of the Job to create


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def decide_compression(namespace: str, name: str, attempts: list[Attempt], backoff_limit: int, generation: int,
                       now: float, retry_base_s: float, retry_max_s: float) -> Decision:
    """The Compressed condition while the FineTune has no delta: record a succeeded attempt's
    delta, wait on a running one, back off after a failure, give up after backoff_limit
    retries, or start the next attempt. `attempts` oldest first."""
    for a in attempts:
        if a.outcome.state == jobs.SUCCEEDED and a.outcome.result is not None:
            delta = api.DeltaStatus.from_result(a.outcome.result, generation=a.generation)
            delta.uri = comp.delta_uri(namespace, name, a.generation)
            return Decision(None, "", "", {"delta": delta.to_k8s(), "job": a.name})  # the gate decides next
    failures = [a if a.outcome.state == jobs.FAILED else
                Attempt(a.name, a.generation, a.attempt, jobs.Outcome(jobs.FAILED, f"{Reason.RESULT_UNREADABLE}: the Job succeeded "
                        "but neither its termination message nor result.json holds a result", a.outcome.finished_at))
                for a in attempts if a.outcome.state in (jobs.FAILED, jobs.SUCCEEDED)]
    running = [a for a in attempts if a.outcome.state == jobs.RUNNING]
    total = backoff_limit + 1
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
        due = parse_time(failures[-1].outcome.finished_at) + comp.retry_delay(len(failures), retry_base_s, retry_max_s)
        if now < due:
            when = datetime.fromtimestamp(due, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return Decision(FALSE, Reason.JOB_FAILED_RETRYING, f"{failed}; next attempt after {when}", fields)
    # The next attempt keeps the generation the first one was made for (a serving-only change
    # since then must not rename the attempts of this input).
    job_gen = attempts[0].generation if attempts else generation
    attempt = attempts[-1].attempt + 1 if attempts else 0
    job = comp.job_name(name, job_gen, attempt)
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


def decide_serving(model: str | None, pool: str, conflict: str | None, app: AppStatus | None, backend_error: str | None,
                   digest: str | None, endpoint_base: str, not_served_because: str, keys_problem: str | None = None) -> Decision:
    """The Served condition. model: the tenant's name when it is eligible (gate passed, current
    input, API keys in hand where the pool needs them), else None; keys_problem: why its keys
    are missing; app: its pool's application as the backend reports it, with (once RUNNING) a
    replica's report of its tenants: Served=True only when that replica has the tenant ready."""
    if backend_error is not None:
        return Decision(FALSE, Reason.BACKEND_UNAVAILABLE, backend_error, {"endpoint": None})
    if keys_problem is not None:
        return Decision(FALSE, Reason.API_KEYS_MISSING, keys_problem, {"endpoint": None})
    if model is None:
        return Decision(FALSE, Reason.WAITING_FOR_DELTA, f"not served: {not_served_because}", {"endpoint": None})
    if conflict is not None:
        return Decision(FALSE, Reason.POOL_BASE_CONFLICT, conflict, {"endpoint": None})
    if app is not None and app.status == RUNNING and (app.tenants is None or model in app.tenants):
        d = _tenant_on_replica(model, pool, app.replica, f"{endpoint_base}/{pool}/v1")
        return replace(d, message=f"{d.message} ({app.message})") if app.message else d  # e.g. an upgrade in progress
    if app is not None and app.status in FAILED_APP_STATES:
        return Decision(FALSE, Reason.APPLICATION_FAILED, f"application {pool!r} is {app.status}: {app.message.strip()[:500]}")
    state = (app.status if app else "") or "not reported yet"
    said = f" ({app.message})" if app is not None and app.message else ""  # e.g. KubeRay still initializing
    return Decision(FALSE, Reason.CONFIG_APPLIED, f"serve config {digest} applied; application {pool!r}: {state}{said}")


def _tenant_on_replica(model: str, pool: str, report: ReplicaReport | None, endpoint: str) -> Decision:
    """A RUNNING application serves the tenant only if its replica has the delta loaded: a
    replica that could not load it answers 503 for it, whatever the application's status."""
    if report is None or report.tenants is None:
        why = report.error if report is not None else "not read yet"
        return Decision(FALSE, Reason.REPLICA_STATUS_UNAVAILABLE,
                        f"application {pool!r} is RUNNING but its replicas' tenant states cannot be read: {why}")
    on = f" on replica {report.replica}" if report.replica else ""
    t = report.tenants.get(model)
    if t is None:
        return Decision(FALSE, Reason.TENANT_LOADING, f"application {pool!r} is RUNNING; its replica{on} has not taken "
                        f"model {model!r} yet (the config update is on its way)")
    if t.state == "ready":
        return Decision(TRUE, Reason.APPLICATION_RUNNING, f"model {model!r} served by application {pool!r} at {endpoint}",
                        {"endpoint": endpoint})
    if t.state == "failed":
        return Decision(FALSE, Reason.TENANT_LOAD_FAILED,
                        f"model {model!r} failed to load{on} of application {pool!r}: {t.error.strip()[:700]}")
    return Decision(FALSE, Reason.TENANT_LOADING, f"model {model!r} is loading{on} of application {pool!r}")
