"""Pure-Python fakes of what the reconciler talks to: the Kubernetes API calls it makes
(`FakeCluster`, whose `kube` is an observe.Kube) and a serve backend on the Backend protocol
(`FakeBackend`). Both write into one `journal`, so a test can check the order of the writes."""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass

from kubernetes.client.exceptions import ApiException

from deltafleet.operator import api
from deltafleet.operator.backend import AppStatus, BackendError
from deltafleet.operator.observe import Kube

Key = tuple[str, str]  # (namespace, name)


class Crash(BaseException):
    """The operator process dies here (raised where a test wants a crash; not an Exception, so
    no handler in the operator catches it)."""


def merge_patch(target: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386), as the API server applies `application/merge-patch+json`."""
    out = copy.deepcopy(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _selected(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",") if term))


@dataclass
class _Response:
    """What a `_preload_content=False` call returns: the raw JSON body."""

    data: bytes


@dataclass
class _Secret:
    data: dict


class FakeCluster:
    """FineTunes, Jobs, pods, claims and Secrets as plain dicts; every write in `journal`."""

    def __init__(self, journal: list | None = None):
        self.journal = journal if journal is not None else []
        self.finetunes: dict[Key, dict] = {}
        self.jobs: dict[Key, dict] = {}
        self.pods: dict[Key, dict] = {}
        self.claims: set[Key] = set()
        self.secrets: dict[Key, dict[str, str]] = {}
        self.crash_after: str | None = None  # a journal kind ("job", "status", ...): die right after that write
        self.stale_job_list = False  # LIST answers without the Jobs (a lagging cache), GET/create still see them
        self.kube = Kube(_Custom(self), _Batch(self), _Core(self))

    def write(self, kind: str, key: Key, body) -> None:
        self.journal.append((kind, f"{key[0]}/{key[1]}", copy.deepcopy(body)))
        if self.crash_after == kind:
            raise Crash(kind)

    def writes(self, kind: str) -> list:
        return [body for k, _, body in self.journal if k == kind]

    # -- test set-up

    def add_finetune(self, body: dict) -> None:
        self.finetunes[(body["metadata"]["namespace"], body["metadata"]["name"])] = copy.deepcopy(body)

    def finetune(self, namespace: str, name: str) -> dict:
        return self.finetunes[(namespace, name)]

    def finish_job(self, namespace: str, name: str, result=None, failed: str = "") -> None:
        """The Job controller's part: the Job Complete (its pod's termination message the result) or Failed."""
        job = self.jobs[(namespace, name)]
        kind = "Failed" if failed else "Complete"
        job["status"] = {"conditions": [{"type": kind, "status": "True", "reason": failed or "Completed",
                                         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        terminated = {"exitCode": 1 if failed else 0, "message": result.termination_message() if result else ""}
        self.pods[(namespace, f"{name}-pod")] = {
            "metadata": {"name": f"{name}-pod", "labels": {"batch.kubernetes.io/job-name": name},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"containerStatuses": [{"name": "compress", "state": {"terminated": terminated}}]},
        }

    def set_secret(self, namespace: str, name: str, **keys: str) -> None:
        self.secrets[(namespace, name)] = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}


def _not_found() -> ApiException:
    return ApiException(status=404, reason="Not Found")


class _Custom:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == (api.GROUP, api.VERSION, api.PLURAL)
        if (namespace, name) not in self.c.finetunes:
            raise _not_found()
        return copy.deepcopy(self.c.finetunes[(namespace, name)])

    def list_cluster_custom_object(self, group, version, plural):
        return {"items": [copy.deepcopy(ft) for ft in self.c.finetunes.values()]}

    def list_namespaced_custom_object(self, group, version, namespace, plural):
        return {"items": [copy.deepcopy(ft) for (ns, _), ft in self.c.finetunes.items() if ns == namespace]}

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        if (namespace, name) not in self.c.finetunes:
            raise _not_found()
        ft = self.c.finetunes[(namespace, name)] = merge_patch(self.c.finetunes[(namespace, name)], body)
        self.c.write("annotations", (namespace, name), body["metadata"]["annotations"])
        return copy.deepcopy(ft)

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body):
        if (namespace, name) not in self.c.finetunes:
            raise _not_found()
        ft = self.c.finetunes[(namespace, name)]
        ft["status"] = merge_patch(ft.get("status") or {}, body["status"])
        self.c.write("status", (namespace, name), body["status"])
        return copy.deepcopy(ft)


class _Batch:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def list_namespaced_job(self, namespace, label_selector="", _preload_content=True):
        items = [j for (ns, _), j in self.c.jobs.items() if ns == namespace and _selected(j, label_selector)]
        items = [] if self.c.stale_job_list else items
        return _Response(json.dumps({"items": items}).encode())

    def create_namespaced_job(self, namespace, body):
        key = (namespace, body["metadata"]["name"])
        if key in self.c.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.c.jobs[key] = {**copy.deepcopy(body), "status": {}}
        self.c.write("job", key, body["metadata"]["name"])


class _Core:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def list_namespaced_pod(self, namespace, label_selector="", _preload_content=True):
        items = [p for (ns, _), p in self.c.pods.items() if ns == namespace and _selected(p, label_selector)]
        return _Response(json.dumps({"items": items}).encode())

    def read_namespaced_persistent_volume_claim(self, name, namespace):
        if (namespace, name) not in self.c.claims:
            raise _not_found()
        return {"metadata": {"name": name, "namespace": namespace}}

    def read_namespaced_secret(self, name, namespace):
        if (namespace, name) not in self.c.secrets:
            raise _not_found()
        return _Secret(dict(self.c.secrets[(namespace, name)]))


class FakeBackend:
    """A serve backend on the Backend protocol: holds the last config applied, reports each of
    its pools as `app_state` (not RUNNING by default: RUNNING would ask a replica over HTTP)."""

    name = "fake"

    def __init__(self, journal: list | None = None, app_state: str = "DEPLOYING"):
        self.journal = journal if journal is not None else []
        self.config: dict | None = None
        self.digest: str | None = None
        self.app_state = app_state
        self.down = False  # every call fails, as an unreachable backend does

    def _check(self) -> None:
        if self.down:
            raise BackendError("connection refused")

    def applied_hash(self) -> str | None:
        self._check()
        return self.digest

    def apply(self, config: dict, digest: str) -> None:
        self._check()
        self.config, self.digest = copy.deepcopy(config), digest
        self.journal.append(("config", digest, copy.deepcopy(config)))

    def recheck(self) -> str | None:
        return self.applied_hash()

    def statuses(self) -> dict[str, AppStatus]:
        self._check()
        return {app["name"]: AppStatus(self.app_state) for app in (self.config or {}).get("applications") or []}

    def tenants(self) -> dict[str, dict]:
        """Every tenant of the applied config: model -> its user_config entry."""
        out: dict[str, dict] = {}
        for app in (self.config or {}).get("applications") or []:
            for dep in app.get("deployments") or []:
                out.update(((dep.get("user_config") or {}).get("tenants")) or {})
        return out
