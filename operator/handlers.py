"""kopf wiring: which events call the reconciler, with what retries, timeouts and backoff.

Handlers are registered into a fresh registry by `register()`, because their timing (resync
interval, delete attempts) comes from the operator's settings at start-up.
"""

from __future__ import annotations

import logging

import kopf
from kubernetes.client.exceptions import ApiException

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator.backend import BackendError
from deltafleet.operator import metrics
from deltafleet.operator.controller import Controller, InvalidSpec, PolicyRefused
from deltafleet.operator.settings import Settings

PREFIX = api.GROUP  # finalizer and progress annotations: deltafleet.dev/…
FINALIZER = f"{PREFIX}/finalizer"
JOB_SELECTOR = {comp.LABEL_MANAGED_BY: comp.MANAGED_BY}


def peering_priority(started_at: float, tiebreak: int) -> int:
    """This replica's kopf peering priority: the older the process, the higher.

    kopf pauses every peer that sees a live peer of higher priority, and pauses ALL peers that
    share one priority, so every replica needs its own. Ordering by start time means a new
    replica (a rollout, a restart) never takes over from the one acting: it waits until that
    one's keep-alive expires or it leaves. Milliseconds since the epoch times 1024 plus 10 random
    bits (replicas started in the same millisecond still differ), subtracted from 2**53, so the
    value stays positive and exact as a JSON number (under 2**53) until about the year 2250."""
    if not 0 <= tiebreak < 1024:
        raise ValueError(f"tiebreak must be in [0, 1024), got {tiebreak}")
    return 2**53 - (int(started_at * 1000) * 1024 + tiebreak)


def configure(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    kopf_settings.persistence.finalizer = FINALIZER
    # High availability: how long a replica's keep-alive in the peering object counts. A replica
    # killed without a goodbye (SIGKILL, a lost node) is taken over from after at most this.
    kopf_settings.peering.lifetime = settings.peering_lifetime
    # Least privilege: the chart grants no cluster-wide reads of namespaces or CRDs, so kopf
    # must not observe them (it would retry 403s for about a minute before serving anything).
    # The FineTune API is found through discovery; watched namespaces are taken as given.
    kopf_settings.scanning.disabled = True
    # Annotations, not status: the CRD's status schema is structural and would prune status.kopf.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    # Watches end on the server's side before a silent network drop could stall them.
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 30
    kopf_settings.networking.request_timeout = 60
    # Our own Events (one per condition transition) are explicit; only warnings from logs are posted.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.execution.max_workers = 8
    kopf_settings.batching.error_delays = [1, 5, 15, 60]


def _run(ctl: Controller, namespace: str, name: str) -> None:
    """Translate the reconciler's failures into kopf's vocabulary, counting each outcome."""
    with metrics.RECONCILE_SECONDS.time():
        try:
            ctl.reconcile(namespace, name)
        except PolicyRefused as e:
            metrics.RECONCILES.labels("refused").inc()
            raise kopf.PermanentError(f"refused by policy: {e}") from None
        except InvalidSpec as e:
            metrics.RECONCILES.labels("invalid").inc()
            raise kopf.PermanentError(f"invalid spec: {e}") from None
        except BackendError as e:
            metrics.RECONCILES.labels("retry").inc()
            raise kopf.TemporaryError(f"serve backend: {e}", delay=ctl.settings.resync_seconds) from None
        except ApiException as e:
            metrics.RECONCILES.labels("retry").inc()
            raise kopf.TemporaryError(f"Kubernetes API: HTTP {e.status} {e.reason}", delay=5) from None
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            raise
        metrics.RECONCILES.labels("ok").inc()


def register(registry: kopf.OperatorRegistry, ctl: Controller) -> None:
    """Every handler of the operator, into `registry`."""
    _register_startup(registry, ctl)
    _register_reconcile(registry, ctl)
    _register_job_events(registry, ctl)
    _register_finalizer(registry, ctl)


def _finetunes(registry: kopf.OperatorRegistry) -> dict:
    """The resource arguments of a FineTune handler."""
    return dict(group=api.GROUP, version=api.VERSION, plural=api.PLURAL, registry=registry)


def _register_startup(registry: kopf.OperatorRegistry, ctl: Controller) -> None:
    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_):
        configure(settings, ctl.settings)

    # A fresh registry has none of kopf's default login handlers: in-cluster or KUBECONFIG,
    # the same sources the kubernetes client of the reconciler uses.
    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)


def _register_reconcile(registry: kopf.OperatorRegistry, ctl: Controller) -> None:
    """Create, resume, spec update and the periodic resync: each reconciles the FineTune."""
    settings = ctl.settings
    ft = _finetunes(registry)
    change = dict(retries=20, backoff=5, timeout=600)

    @kopf.on.create(**ft, id="create", **change)
    def on_create(namespace, name, **_):
        _run(ctl, namespace, name)

    @kopf.on.resume(**ft, id="resume", **change)
    def on_resume(namespace, name, **_):
        _run(ctl, namespace, name)

    # Spec only: status and our own annotations change on every reconcile and must not loop.
    @kopf.on.update(**ft, id="update", field="spec", **change)
    def on_update(namespace, name, **_):
        _run(ctl, namespace, name)

    # Follows Jobs in flight, backoff deadlines and the serve backend's status; idle-safe.
    @kopf.timer(**ft, id="resync", interval=settings.resync_seconds, initial_delay=settings.resync_seconds,
                retries=None, backoff=settings.resync_seconds, timeout=600)
    def resync(namespace, name, **_):
        try:
            _run(ctl, namespace, name)
        except kopf.PermanentError:
            pass  # already recorded as a condition; the spec must change first


def _register_job_events(registry: kopf.OperatorRegistry, ctl: Controller) -> None:
    @kopf.on.event("batch", "v1", "jobs", labels=JOB_SELECTOR, registry=registry, id="job-finished")
    def on_job(namespace, labels, body, **_):
        """A compression Job changed: reconcile its FineTune now instead of at the next resync."""
        done = any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
                   for c in (body.get("status") or {}).get("conditions") or [])
        if done and labels.get(comp.LABEL_FINETUNE):
            try:
                _run(ctl, namespace, labels[comp.LABEL_FINETUNE])
            except (kopf.TemporaryError, kopf.PermanentError) as e:
                logging.getLogger("deltafleet.operator").info("job event for %s: %s", labels[comp.LABEL_FINETUNE], e)


def _register_finalizer(registry: kopf.OperatorRegistry, ctl: Controller) -> None:
    settings = ctl.settings
    ft = _finetunes(registry)

    @kopf.on.delete(**ft, id="finalize", retries=settings.delete_attempts, backoff=5, timeout=120)
    def on_delete(body, retry, namespace, name, **_):
        """Bounded: after delete_attempts failures the finalizer goes anyway, with a Warning,
        so nothing hangs in Terminating."""
        try:
            ctl.finalize(dict(body))
        except Exception as e:  # noqa: BLE001 -- every failure counts against the bound
            if retry + 1 >= settings.delete_attempts:
                kopf.warn(body, reason="FinalizerDropped",
                          message=f"gave up cleaning up {namespace}/{name} after {retry + 1} attempts: {e}")
                return
            raise kopf.TemporaryError(f"cleanup of {namespace}/{name}: {e}", delay=min(60, 5 * 2 ** retry)) from None
        kopf.info(body, reason="Deleted", message=f"removed from pool; deletionPolicy {(body.get('spec') or {}).get('deletionPolicy', 'Delete')}")
