"""The pools' tenant-status route as the operator uses it: the status key and the HTTP read.

A pool's application being RUNNING says nothing about a tenant's delta: a replica that could
not read it (missing file, corrupt, built on another base) answers 503 for that tenant. So the
operator asks a replica, through the same serve endpoint clients use (Settings.endpoint_base),
`GET <endpoint>/<pool>/-/tenants` (serving.config.TENANT_STATUS_ROUTE), validates the answer
with the model the route serializes (serving.config.TenantStatesReport), and the Served
decision (decisions.decide_serving) uses it.

With `auth: keys` the route answers only the pool status key: the operator reads it from a
file (`--serve-status-key-file`, the chart mounts a Secret) on every use, so a rotated Secret
takes effect without a restart, and writes only its sha256 into each pool's `user_config`
(`status_key_sha256`, a reconfigure, never a replica restart).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace

from deltafleet.operator.backend import RUNNING, AppStatus, BackendError, ReplicaReport, TenantState
from deltafleet.operator.settings import Settings
from deltafleet.serving.config import (
    TENANT_SET_DEPLOYMENTS, TENANT_STATUS_ROUTE, ConfigError, TenantsConfig, key_digest, parse_tenant_states,
)

TIMEOUT_S = 5.0


def status_key(settings: Settings) -> str | None:
    """The pool status key from its file; None when no file is set. An unreadable or empty
    file is a BackendError naming it (nothing would be able to read the tenants' states)."""
    path = settings.serve_status_key_file
    if not path:
        return None
    try:
        key = open(path, encoding="utf-8").read().strip()
    except OSError as e:
        raise BackendError(f"pool status key file {path}: {e.strerror}") from None
    if not key:
        raise BackendError(f"pool status key file {path} is empty")
    return key


def with_status_key(config: dict, key: str | None) -> dict:
    """The serve config with the status key's digest in every pool's user_config (pure; the
    input is not changed). Validated by serving's own TenantsConfig, as replicas will."""
    if key is None:
        return config
    digest = key_digest(key)
    apps = []
    for app in config.get("applications") or []:
        deployments = []
        for dep in app.get("deployments") or []:
            if dep.get("name") in TENANT_SET_DEPLOYMENTS:
                user_config = TenantsConfig.model_validate({**(dep.get("user_config") or {}), "status_key_sha256": digest})
                dep = {**dep, "user_config": user_config.model_dump(exclude_defaults=True)}
            deployments.append(dep)
        apps.append({**app, "deployments": deployments})
    return {**config, "applications": apps}


def read_report(endpoint_base: str, pool: str, key: str | None, timeout: float = TIMEOUT_S) -> ReplicaReport:
    """One replica's tenant states (whichever the router picks), or why they could not be read."""
    url = f"{endpoint_base.rstrip('/')}/{pool}{TENANT_STATUS_ROUTE}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        hint = ""
        if e.code == 404:
            hint = (" (a pool with auth: keys answers 404 without the operator's status key: set --serve-status-key-file,"
                    " chart serve.statusKey; or its replicas run an image without this route)")
        return ReplicaReport(None, f"GET {url}: HTTP {e.code}{hint}")
    except (urllib.error.URLError, OSError) as e:
        return ReplicaReport(None, f"GET {url}: {getattr(e, 'reason', None) or e}")
    except ValueError:
        return ReplicaReport(None, f"GET {url}: the answer is not JSON")
    return parse_report(body, url)


def parse_report(body: object, where: str) -> ReplicaReport:
    """A replica's answer validated by the contract's own model (serving.config.TenantStatesReport,
    which the route serializes); a body that is not one is an unreadable report naming the field."""
    try:
        report = parse_tenant_states(body)
    except ConfigError as e:
        return ReplicaReport(None, f"GET {where}: {e}")
    tenants = {name: TenantState(t.state, t.error or "", len(t.replicas)) for name, t in report.tenants.items()}
    return ReplicaReport(tenants, replica=report.replica, replicas=len(report.replicas))


def attach_reports(statuses: dict[str, AppStatus], settings: Settings) -> dict[str, AppStatus]:
    """Each RUNNING application with a replica's report of its tenants (others as they are).
    A status key that cannot be read is reported on every RUNNING pool, not raised."""
    running = [name for name, app in statuses.items() if app.status == RUNNING]
    if not running:
        return statuses
    try:
        key = status_key(settings)
    except BackendError as e:
        return {**statuses, **{name: replace(statuses[name], replica=ReplicaReport(None, str(e))) for name in running}}
    return {**statuses, **{name: replace(statuses[name], replica=read_report(settings.endpoint_base, name, key)) for name in running}}
