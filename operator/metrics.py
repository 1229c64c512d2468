"""The operator's Prometheus metrics, served on --metrics-port (chart: a Service, optionally a ServiceMonitor).

    deltafleet_operator_reconciles_total{result}            ok | invalid | refused | retry | error
    deltafleet_operator_reconcile_seconds                   histogram of one reconcile
    deltafleet_operator_finetunes{phase}                    FineTunes by status.phase, at the last serve-config sync
    deltafleet_operator_jobs_total{outcome}                 compression Jobs created / succeeded / failed
    deltafleet_operator_serve_config_applies_total          serve configs applied (hash changed)
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from deltafleet.operator.conditions import Phase

RECONCILES = Counter("deltafleet_operator_reconciles", "FineTune reconciles by result", ["result"])
RECONCILE_SECONDS = Histogram("deltafleet_operator_reconcile_seconds", "time of one FineTune reconcile",
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
FINETUNES = Gauge("deltafleet_operator_finetunes", "FineTunes by phase", ["phase"])
JOBS = Counter("deltafleet_operator_jobs", "compression Jobs by outcome", ["outcome"])
APPLIES = Counter("deltafleet_operator_serve_config_applies", "serve configs applied to the backend")
PHASES = tuple(p.value for p in Phase)


def serve(port: int) -> None:
    """Expose /metrics on 0.0.0.0:port from a daemon thread (0: off)."""
    if port:
        start_http_server(port)


def count_phases(phases: list[str]) -> None:
    for phase in {*PHASES, *phases}:
        FINETUNES.labels(phase).set(sum(1 for p in phases if p == phase))
