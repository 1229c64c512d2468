"""`rayservice` backend: write the config into `spec.serveConfigV2` (a YAML string) of a
KubeRay RayService and read the applications' status KubeRay reports back.

The config's hash is kept in an annotation of the RayService, so the operator (or a
restarted one) patches only when the content changes; a patch carries the resourceVersion
it read, so a concurrent edit makes it fail (409) and retry instead of being overwritten.
The annotation counts only while `serveConfigV2` still hashes to it: a RayService recreated
from a saved manifest without the config (the test on a real node did exactly that) keeps
the annotation and would otherwise never get its tenants back.

KubeRay leaves worker replica bounds out of its hash of the cluster spec, so a changed
`minReplicas`/`maxReplicas` of a worker group (`helm upgrade --set pool.workers.maxReplicas=8`)
never reaches a RayCluster that exists (kuberay#2331): `recheck` copies them from the
RayService to the clusters it names."""

from __future__ import annotations

import logging

import yaml

from deltafleet.operator.backend import DEPLOY_FAILED, RUNNING, AppStatus, BackendError

log = logging.getLogger("deltafleet.operator")
INITIALIZING_TIMEOUT = "InitializingTimeout"  # KubeRay's terminal Ready=False reason (ray.io/initializing-timeout)

GROUP, VERSION, PLURAL, CLUSTERS = "ray.io", "v1", "rayservices", "rayclusters"
BOUNDS = ("minReplicas", "maxReplicas")
HASH_ANNOTATION = "deltafleet.dev/serve-config-hash"


class RayServiceBackend:
    name = "rayservice"

    def __init__(self, namespace: str, name: str, api_client=None):
        from kubernetes import client

        self.namespace, self.rs_name = namespace, name
        self.api = client.CustomObjectsApi(api_client)

    def _get(self) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.rs_name)
        except ApiException as e:
            raise BackendError(f"RayService {self.namespace}/{self.rs_name}: HTTP {e.status} {e.reason}") from None

    def applied_hash(self) -> str | None:
        return applied_hash(self._get())

    def apply(self, config: dict, digest: str) -> None:
        from kubernetes.client.exceptions import ApiException

        current = self._get()
        patch = {
            "metadata": {"annotations": {HASH_ANNOTATION: digest}, "resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)},
        }
        try:
            self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.rs_name, patch)
        except ApiException as e:
            raise BackendError(f"patching RayService {self.namespace}/{self.rs_name}: HTTP {e.status} {e.reason}") from None

    def statuses(self) -> dict[str, AppStatus]:
        return application_statuses(self._get())

    def recheck(self) -> str | None:
        """One read of the RayService: its clusters' worker bounds brought to its own, and the
        hash of the config it holds."""
        rs = self._get()
        for change in self._sync_worker_bounds(rs):
            log.info("worker bounds from the RayService: %s", change)
        return applied_hash(rs)

    def _sync_worker_bounds(self, rs: dict) -> list[str]:
        """Patch the worker bounds of the RayService's clusters (serving and pending) to the
        RayService's own; returns what it changed, one line each."""
        from kubernetes.client.exceptions import ApiException

        changed = []
        status = rs.get("status") or {}
        for which in ("activeServiceStatus", "pendingServiceStatus"):
            cluster = (status.get(which) or {}).get("rayClusterName")
            if not cluster:
                continue
            try:
                rc = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, CLUSTERS, cluster)
                patch = worker_bounds_patch(rs, rc)
                if patch:  # a JSON patch: its "test" ops guard the indices
                    self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, CLUSTERS, cluster, patch,
                                                            _content_type="application/json-patch+json")
                    changed += [f"RayCluster {cluster}: {op['path']} = {op['value']}" for op in patch if op["op"] == "add"]
            except ApiException as e:
                if e.status != 404:  # gone between the two reads: KubeRay switched clusters meanwhile
                    raise BackendError(f"RayCluster {self.namespace}/{cluster}: HTTP {e.status} {e.reason}") from None
        return changed


def application_statuses(rs: dict) -> dict[str, AppStatus]:
    """What each application's status is, read from a RayService as KubeRay (v1.5) writes it.

    - Before KubeRay has observed the latest spec (every serve-config patch, every helm
      upgrade bumps the generation) the last statuses it wrote stand: what serves now has not
      changed yet, and whether a new tenant is served is decided by the replica's own report.
      (Reporting nothing there flipped every tenant to Ready=False for a moment on each patch;
      the real KubeRay showed it at the start of an upgrade.)
    - First install: there is no active cluster yet; the applications live in
      `pendingServiceStatus` until every one is RUNNING (then the cluster is promoted and the
      serve Service appears). Their DEPLOYING / DEPLOY_FAILED and Ray's message are reported,
      so a first-install failure is visible instead of "not reported yet" for ever. Before
      any cluster reports an application, the RayService's own Ready condition speaks for the
      applied ones: its reason and message while it initializes, and a failure once KubeRay
      gives up (InitializingTimeout: it deletes the clusters and never retries).
    - Upgrade (a pending cluster beside the active one): KubeRay reconciles Serve only on the
      pending cluster and clears the active one's application statuses, though the active
      cluster keeps serving. An application it cleared is reported RUNNING — whether a tenant
      is served is then decided by what the serving replica reports — with the upgrade and the
      new cluster's state (its failure included) in the message; so is an application of the
      applied config that neither cluster reports yet (KubeRay cleared the active cluster's
      statuses before the pending one reported any)."""
    status = rs.get("status") or {}
    active_status, pending_status = status.get("activeServiceStatus") or {}, status.get("pendingServiceStatus") or {}
    active, pending = _apps(active_status), _apps(pending_status)
    active_cluster, pending_cluster = active_status.get("rayClusterName"), pending_status.get("rayClusterName")
    if not active_cluster and not active:  # no cluster serves yet
        where = f"the new cluster {pending_cluster}" if pending_cluster else "a cluster KubeRay has not created yet"
        out = {name: AppStatus(status=a.status, message=f"first install, on {where}: {a.message}".rstrip(": "))
               for name, a in pending.items()}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        if ready is not None and ready.get("status") != "True":
            said = f"RayService {ready.get('reason') or 'not ready'}: {(ready.get('message') or '').strip()}".rstrip(": ")
            failed = ready.get("reason") == INITIALIZING_TIMEOUT
            for name in configured_applications(rs):
                if name not in out:
                    out[name] = AppStatus(status=DEPLOY_FAILED if failed else "", message=f"first install: {said}")
        return out
    out = {}
    names = set(active) | set(pending)
    if pending_cluster:
        names |= set(configured_applications(rs))
    for name in sorted(names):
        a, p = active.get(name), pending.get(name)
        upgrade = ""
        if pending_cluster:
            state = f"{p.status}{': ' + p.message if p.message and p.status != RUNNING else ''}" if p else "not deployed yet"
            upgrade = f"upgrade in progress: {active_cluster} serves while KubeRay prepares {pending_cluster} (there: {state})"
        if a is not None and a.status:
            out[name] = AppStatus(status=a.status, message="; ".join(m for m in (a.message, upgrade) if m))
        elif pending_cluster:  # cleared by KubeRay for the upgrade: the active cluster still serves it
            out[name] = AppStatus(status=RUNNING, message=upgrade)
    return out


def worker_bounds_patch(rayservice: dict, raycluster: dict) -> list[dict]:
    """A JSON patch that gives the RayCluster's worker groups the RayService's min/max replicas,
    matching groups by name; [] when they agree. Each index is guarded by a `test` of the
    group's name, so a cluster edited meanwhile makes the patch fail instead of hitting another group."""
    wanted = {g.get("groupName"): g for g in ((rayservice.get("spec") or {}).get("rayClusterConfig") or {}).get("workerGroupSpecs") or []}
    patch = []
    for i, group in enumerate((raycluster.get("spec") or {}).get("workerGroupSpecs") or []):
        want = wanted.get(group.get("groupName"))
        if want is None:
            continue
        ops = [{"op": "add", "path": f"/spec/workerGroupSpecs/{i}/{field}", "value": want[field]}
               for field in BOUNDS if field in want and group.get(field) != want[field]]
        if ops:
            patch += [{"op": "test", "path": f"/spec/workerGroupSpecs/{i}/groupName", "value": group["groupName"]}, *ops]
    return patch


def configured_applications(rs: dict) -> list[str]:
    """The application names in the RayService's serveConfigV2 (what the operator applied)."""
    try:
        config = yaml.safe_load((rs.get("spec") or {}).get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        return []
    return [a["name"] for a in config.get("applications") or [] if isinstance(a, dict) and a.get("name")]


def _apps(service_status: dict) -> dict[str, AppStatus]:
    apps = service_status.get("applicationStatuses") or {}
    return {name: AppStatus(status=a.get("status") or "", message=(a.get("message") or "").strip()) for name, a in apps.items()}


def applied_hash(rayservice: dict) -> str | None:
    """The hash of the serve config this RayService holds: its annotation, when `serveConfigV2`
    is there and hashes to it; else None (a config to apply)."""
    from deltafleet.operator.serveconfig import config_hash

    said = ((rayservice.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    text = (rayservice.get("spec") or {}).get("serveConfigV2")
    if not said or not text:
        return None
    try:
        held = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return said if isinstance(held, dict) and config_hash(held) == said else None
