"""A pool's TenantDirectory: which replica holds which tenant now, and whether each delta loads.

One replica per pool, no GPU, nothing on the request path. Engine replicas report what they
hold (serving/replica.py, every few seconds and on every change); a replica not heard from
for `GONE_AFTER_S` is gone and holds nothing. A tenant is `ready` once its delta (this URI)
has loaded on some replica — by traffic or by the directory's own load check, which it runs
for every tenant of the catalog not yet verified, routed like a request (so it warms the
replica the tenant would go to) — `failed`, with the replica's message, when a load of it
failed (on any replica, lately) or the check failed, and `loading` until either. The
ingress's tenant-status route answers `states()` (serving.config.TenantStatesReport).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from .config import DIRECTORY, TenantLoadState, TenantReport, TenantStatesReport, parse_args, parse_tenants

log = logging.getLogger("deltafleet.serving")

GONE_AFTER_S = 10.0  # a replica silent this long is gone (it reports every REPORT_EVERY_S)
RECHECK_FAILED_S = 30.0  # a tenant whose check failed is checked again after this long
CHECKS_AT_ONCE = 4  # load checks in flight: one replica loads one tenant at a time anyway
# Checks wait until no new replica has reported for this long: a pool's replicas start within
# seconds of each other, and checks sent to the first one alone would all land there.
SETTLE_S = 10.0


@serve.deployment(name=DIRECTORY, num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class TenantDirectory:
    def __init__(self, args: dict, engine) -> None:
        self.args = parse_args(args)
        self.engine = engine  # the DeltaServer deployment's handle
        self.catalog: dict[str, str] = {}  # tenant -> its delta URI
        self.replicas: dict[str, tuple[float, dict[str, TenantReport]]] = {}  # replica -> (heard at, what it holds)
        self.replica_figures: dict[str, dict] = {}  # replica -> its bank's counters, as last reported
        self.verified: dict[str, str] = {}  # tenant -> the URI that loaded
        self.checked: dict[str, tuple[str, str, float]] = {}  # tenant -> (URI, why, when) of a failed check
        self.checking: set[str] = set()
        self.last_new_replica = 0.0  # when a replica reported for the first time
        self._lock = threading.Lock()
        self._checks = ThreadPoolExecutor(CHECKS_AT_ONCE, thread_name_prefix="load-check")

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_tenants(user_config, pool=self.args.pool)
        with self._lock:
            self.catalog = {name: spec.uri for name, spec in cfg.tenants.items()}
        self._start_checks()

    def report(self, replica: str, held: dict, figures: dict | None = None) -> None:
        """A replica's report: what it holds ({tenant: TenantReport}); replaces its last one."""
        now = time.monotonic()
        reports = {name: TenantReport.model_validate(r) for name, r in held.items()}
        with self._lock:
            if replica not in self.replicas:
                self.last_new_replica = now
            self.replicas[replica] = (now, reports)
            self.replica_figures[replica] = figures or {}
            for name, r in reports.items():
                if r.state == "ready" and r.uri and r.uri == self.catalog.get(name):
                    self.verified[name] = r.uri
        self._start_checks()

    def states(self, answering: str = "") -> dict:
        """The TenantStatesReport of every tenant in the catalog."""
        now = time.monotonic()
        with self._lock:
            live = {r: held for r, (at, held) in self.replicas.items() if now - at < GONE_AFTER_S}
            tenants = {name: self._state(name, uri, live) for name, uri in self.catalog.items()}
        return TenantStatesReport(replica=answering, replicas=sorted(live), tenants=tenants).model_dump(mode="json")

    def figures(self) -> dict[str, dict]:
        """Each live replica's last reported bank figures (loads, hits, bytes per tier)."""
        now = time.monotonic()
        with self._lock:
            return {r: self.replica_figures.get(r, {}) for r, (at, _) in self.replicas.items() if now - at < GONE_AFTER_S}

    def _state(self, name: str, uri: str, live: dict[str, dict[str, TenantReport]]) -> TenantLoadState:
        holders = sorted(r for r, held in live.items() if (t := held.get(name)) and t.state == "ready" and t.uri == uri)
        failed = [(r, t.error) for r, held in live.items() if (t := held.get(name)) and t.state == "failed" and t.uri == uri]
        if failed:  # a delta that does not load on a replica is failed, whoever else holds it
            return TenantLoadState(state="failed", error=f"replica {failed[0][0]}: {failed[0][1]}", replicas=holders)
        if self.verified.get(name) == uri:
            return TenantLoadState(state="ready", replicas=holders)
        check = self.checked.get(name)
        if check is not None and check[0] == uri:
            return TenantLoadState(state="failed", error=check[1], replicas=holders)
        return TenantLoadState(state="loading", replicas=holders)

    # ---- load checks ------------------------------------------------------------------
    def _start_checks(self) -> None:
        if self.args.placement == "all":  # every replica loads every tenant: their reports say it
            return
        now = time.monotonic()
        with self._lock:
            if not self.replicas or now - self.last_new_replica < SETTLE_S:
                return  # the next report starts them
            due = [name for name, uri in self.catalog.items()
                   if self.verified.get(name) != uri and name not in self.checking
                   and not ((c := self.checked.get(name)) and c[0] == uri and now - c[2] < RECHECK_FAILED_S)]
            self.checking.update(due)
        for name in due:
            self._checks.submit(self._check, name)

    def _check(self, name: str) -> None:
        with self._lock:
            uri = self.catalog.get(name)
        try:
            if uri is None:
                return
            try:
                out = self.engine.options(multiplexed_model_id=name).check.remote(name).result(
                    timeout_s=self.args.load_timeout_s + 30)
            except Exception as e:  # noqa: BLE001 -- no replica yet, one restarting: the next report retries
                log.info("load check of %s: %s", name, e)
                time.sleep(1.0)
                return
            with self._lock:
                if out["state"] == "ready":
                    self.verified[name] = uri
                    self.checked.pop(name, None)
                else:
                    self.checked[name] = (uri, f"replica {out['replica']}: {out['error']}", time.monotonic())
        finally:
            with self._lock:
                self.checking.discard(name)
