"""Status conditions of a FineTune: the types, the CamelCase reasons (all defined here, once),
one `set_condition` helper, and the reducers for `Ready` and the display-only `phase`.

Conditions are the truth; `phase` is a one-word summary for `kubectl get ft`.
Everything here is pure: the handlers decide, these functions only compute the new list.
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from datetime import datetime, timezone

from deltafleet.operator.api import Phase

# Condition types.
COMPRESSED = "Compressed"
SERVED = "Served"
READY = "Ready"
TYPES = (COMPRESSED, SERVED, READY)

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


class Reason:
    """Every reason the operator writes, in one place (CamelCase, as Kubernetes expects)."""

    # Compressed
    INVALID_SPEC = "InvalidSpec"  # the schema let it through, the code cannot run it
    REFUSED_BY_POLICY = "RefusedByPolicy"  # the admin's policy forbids what the spec asks (no Job)
    JOB_CREATED = "JobCreated"  # the Job of this generation exists, its pod has not finished
    POD_CANNOT_START = "PodCannotStart"  # image pull, scheduling, a missing Secret: it will not start by itself
    MODEL_STORE_MISSING = "ModelStoreMissing"  # the store's claim is not in the FineTune's namespace (no Job)
    JOB_FAILED_RETRYING = "JobFailedRetrying"  # an attempt failed; the next one waits for its backoff, or runs
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"  # every attempt failed: Failed for good
    RESULT_UNREADABLE = "ResultUnreadable"  # the Job succeeded but wrote no readable result
    FIDELITY_BELOW_THRESHOLD = "FidelityBelowThreshold"  # the quality gate said no: not served
    DELTA_READY = "DeltaReady"  # compressed and through the gate

    # Served
    WAITING_FOR_DELTA = "WaitingForDelta"
    CONFIG_APPLIED = "ConfigApplied"  # the pool's serve config holds the tenant; app not RUNNING yet
    APPLICATION_RUNNING = "ApplicationRunning"  # the application runs and a replica reports the tenant ready
    TENANT_LOADING = "TenantLoading"  # the application runs; a replica is still reading the tenant's delta
    TENANT_LOAD_FAILED = "TenantLoadFailed"  # a replica could not load the delta (it answers 503): the replica's error
    REPLICA_STATUS_UNAVAILABLE = "ReplicaStatusUnavailable"  # the application runs; its tenant-status route cannot be read
    APPLICATION_FAILED = "ApplicationFailed"
    BACKEND_UNAVAILABLE = "BackendUnavailable"
    POOL_BASE_CONFLICT = "PoolBaseConflict"  # another base model already owns this pool
    API_KEYS_MISSING = "ApiKeysMissing"  # the pool needs API keys and this FineTune's cannot be read
    DELETING = "Deleting"

    # Ready
    READY = "Ready"
    NOT_COMPRESSED = "NotCompressed"
    NOT_SERVED = "NotServed"


@dataclass(frozen=True)
class Transition:
    """A condition whose status or reason changed: each one becomes an Event."""

    type: str
    status: str
    reason: str
    message: str

    @property
    def event_type(self) -> str:
        return "Warning" if self.reason in WARNING_REASONS else "Normal"


WARNING_REASONS = {
    Reason.INVALID_SPEC,
    Reason.REFUSED_BY_POLICY,
    Reason.API_KEYS_MISSING,
    Reason.POD_CANNOT_START,
    Reason.MODEL_STORE_MISSING,
    Reason.JOB_FAILED_RETRYING,
    Reason.BACKOFF_LIMIT_EXCEEDED,
    Reason.RESULT_UNREADABLE,
    Reason.FIDELITY_BELOW_THRESHOLD,
    Reason.APPLICATION_FAILED,
    Reason.TENANT_LOAD_FAILED,
    Reason.REPLICA_STATUS_UNAVAILABLE,
    Reason.BACKEND_UNAVAILABLE,
    Reason.POOL_BASE_CONFLICT,
}


def iso(timestamp: float) -> str:
    """Seconds since the epoch as RFC 3339 in UTC, whole seconds (a condition's time)."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


def get_condition(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict] | None, type_: str) -> bool:
    c = get_condition(conditions, type_)
    return bool(c) and c.get("status") == TRUE


def set_condition(
    conditions: list[dict] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> tuple[list[dict], Transition | None]:
    """Return the new condition list (input untouched, order by TYPES) and the transition, if any.

    `lastTransitionTime` moves only when the status changes (Kubernetes API conventions);
    a new reason or message updates in place. A transition is reported when the status or
    the reason changed, so every Event marks a real change and a resync posts nothing.
    """
    if type_ not in TYPES:
        raise ValueError(f"unknown condition type {type_!r}; expected one of {TYPES}")
    if status not in (TRUE, FALSE, UNKNOWN):
        raise ValueError(f"condition {type_}: status must be True, False or Unknown, got {status!r}")
    old = get_condition(conditions, type_)
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "observedGeneration": generation,
        "lastTransitionTime": now or now_iso(),
    }
    if old is not None and old.get("status") == status:
        new["lastTransitionTime"] = old.get("lastTransitionTime", new["lastTransitionTime"])
    changed = old is None or old.get("status") != status or old.get("reason") != reason
    others = [dict(c) for c in conditions or [] if c.get("type") != type_]
    out = sorted(others + [new], key=lambda c: TYPES.index(c["type"]) if c["type"] in TYPES else len(TYPES))
    return out, (Transition(type_, status, reason, new["message"]) if changed else None)


def reduce_ready(conditions: list[dict], generation: int | None, now: str | None = None) -> tuple[list[dict], Transition | None]:
    """Ready = Compressed and Served, both for this generation."""
    compressed = get_condition(conditions, COMPRESSED)
    served = get_condition(conditions, SERVED)
    if not (compressed and compressed["status"] == TRUE and compressed.get("observedGeneration") == generation):
        msg = compressed["message"] if compressed else "not compressed yet"
        return set_condition(conditions, READY, FALSE, Reason.NOT_COMPRESSED, msg, generation, now)
    if not (served and served["status"] == TRUE and served.get("observedGeneration") == generation):
        msg = served["message"] if served else "not served yet"
        return set_condition(conditions, READY, FALSE, Reason.NOT_SERVED, msg, generation, now)
    return set_condition(conditions, READY, TRUE, Reason.READY, "compressed and served", generation, now)


def reduce_phase(conditions: list[dict], deleting: bool = False) -> str:
    """One word for `kubectl get ft`; derived from the conditions, never read back."""
    if deleting:
        return Phase.Deleting.value
    compressed = get_condition(conditions, COMPRESSED) or {}
    reason = compressed.get("reason")
    if reason == Reason.FIDELITY_BELOW_THRESHOLD:
        return Phase.Rejected.value
    if reason in (Reason.BACKOFF_LIMIT_EXCEEDED, Reason.INVALID_SPEC, Reason.REFUSED_BY_POLICY):
        return Phase.Failed.value
    if reason == Reason.JOB_FAILED_RETRYING:
        return Phase.Retrying.value
    if compressed.get("status") != TRUE:
        return Phase.Compressing.value if reason == Reason.JOB_CREATED else Phase.Pending.value
    return Phase.Serving.value if is_true(conditions, SERVED) else Phase.Deploying.value


def transitions(old: list[dict], new: list[dict]) -> list[Transition]:
    """Conditions whose status or reason differ between two lists: one Event each."""
    out = []
    for c in new:
        before = get_condition(old, c["type"])
        if before is None or before.get("status") != c["status"] or before.get("reason") != c["reason"]:
            out.append(Transition(c["type"], c["status"], c["reason"], c.get("message", "")))
    return out
