"""How the operator reads a RayService's status as KubeRay v1.5 writes it (a pure table):
the stand-in CRD never had a pending cluster, so first installs and upgrades were misread."""

from __future__ import annotations

import pytest

import yaml

from deltafleet.operator.backend_rayservice import HASH_ANNOTATION, application_statuses, applied_hash, worker_bounds_patch
from deltafleet.operator.serveconfig import config_hash


def rs(active=None, pending=None, generation=2, observed=2, active_cluster="pool-abc", pending_cluster=None,
       configured=(), ready=None):
    def service(apps, cluster):
        return {**({"rayClusterName": cluster} if cluster else {}),
                "applicationStatuses": {n: {"status": s, "message": m} for n, (s, m) in (apps or {}).items()}}
    config = yaml.safe_dump({"applications": [{"name": n} for n in configured]}) if configured else ""
    conditions = [{"type": "Ready", "status": ready[0], "reason": ready[1], "message": ready[2]}] if ready else []
    return {"metadata": {"generation": generation}, "spec": {"serveConfigV2": config},
            "status": {"observedGeneration": observed, "activeServiceStatus": service(active, active_cluster),
                       "pendingServiceStatus": service(pending, pending_cluster), "conditions": conditions}}


CASES = [
    ("before KubeRay observes the latest spec the statuses it last wrote stand",
     rs(active={"llama": ("RUNNING", "")}, observed=1), {"llama": ("RUNNING", "")}),
    ("a running cluster reports its applications",
     rs(active={"llama": ("RUNNING", "")}), {"llama": ("RUNNING", "")}),
    ("applications reported without a cluster name are the serving cluster's",
     rs(active={"llama": ("RUNNING", "")}, active_cluster=None), {"llama": ("RUNNING", "")}),
    ("a first install reports the pending cluster's applications",
     rs(pending={"llama": ("DEPLOYING", "")}, active_cluster=None, pending_cluster="pool-new"),
     {"llama": ("DEPLOYING", "first install, on the new cluster pool-new")}),
    ("a first install whose application failed says so with Ray's message",
     rs(pending={"llama": ("DEPLOY_FAILED", "ImportError: no module named x")}, active_cluster=None, pending_cluster="pool-new"),
     {"llama": ("DEPLOY_FAILED", "first install, on the new cluster pool-new: ImportError: no module named x")}),
    ("during an upgrade an application KubeRay cleared on the serving cluster is still reported running",
     rs(active={"llama": ("", "")}, pending={"llama": ("DEPLOYING", "")}, pending_cluster="pool-new"),
     {"llama": ("RUNNING", "upgrade in progress: pool-abc serves while KubeRay prepares pool-new (there: DEPLOYING)")}),
    ("during an upgrade a failure on the new cluster is in the message, not a failed application",
     rs(active={"llama": ("RUNNING", "")}, pending={"llama": ("DEPLOY_FAILED", "no GPU")}, pending_cluster="pool-new"),
     {"llama": ("RUNNING", "upgrade in progress: pool-abc serves while KubeRay prepares pool-new (there: DEPLOY_FAILED: no GPU)")}),
    ("as an upgrade starts, an applied application neither cluster reports yet is still reported running",
     rs(active={}, pending={}, pending_cluster="pool-new", configured=["llama"]),
     {"llama": ("RUNNING", "upgrade in progress: pool-abc serves while KubeRay prepares pool-new (there: not deployed yet)")}),
    ("before any cluster reports, an applied application says what KubeRay's Ready condition says",
     rs(active_cluster=None, configured=["llama"], ready=("False", "Initializing", "RayService is initializing")),
     {"llama": ("", "first install: RayService Initializing: RayService is initializing")}),
    ("a RayService KubeRay gave up on fails its applications with KubeRay's message",
     rs(active_cluster=None, configured=["llama"],
        ready=("False", "InitializingTimeout", "RayService failed to become ready within the configured timeout of 10m")),
     {"llama": ("DEPLOY_FAILED", "first install: RayService InitializingTimeout: "
                "RayService failed to become ready within the configured timeout of 10m")}),
    ("a pending cluster's own report wins over the RayService's condition",
     rs(pending={"llama": ("DEPLOYING", "")}, active_cluster=None, pending_cluster="pool-new", configured=["llama"],
        ready=("False", "Initializing", "")),
     {"llama": ("DEPLOYING", "first install, on the new cluster pool-new")}),
    ("a failing application of the serving cluster stays failed",
     rs(active={"llama": ("UNHEALTHY", "replica died")}), {"llama": ("UNHEALTHY", "replica died")}),
    ("one failing pool does not hide another running one",
     rs(active={"llama": ("RUNNING", ""), "qwen": ("DEPLOY_FAILED", "bad base")}),
     {"llama": ("RUNNING", ""), "qwen": ("DEPLOY_FAILED", "bad base")}),
]


@pytest.mark.parametrize("sentence, raw, expected", CASES, ids=[c[0] for c in CASES])
def test_application_statuses(sentence, raw, expected):
    got = application_statuses(raw)
    assert {n: (a.status, a.message) for n, a in got.items()} == expected


def _rayservice(annotation: str | None, config: dict | None) -> dict:
    return {"metadata": {"annotations": {HASH_ANNOTATION: annotation} if annotation else {}},
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)} if config is not None else {}}


CONFIG = {"applications": [{"name": "tiny", "route_prefix": "/tiny", "args": {"base_model": "/models/b"}}]}


@pytest.mark.parametrize("annotation, config, held", [
    (config_hash(CONFIG), CONFIG, config_hash(CONFIG)),
    (config_hash(CONFIG), None, None),  # recreated from a saved manifest without the config
    (config_hash(CONFIG), {"applications": []}, None),  # someone edited the config by hand
    (None, CONFIG, None),  # never applied by an operator
], ids=["the config it applied is there", "a recreated rayservice without the config holds nothing",
        "an edited config is not the one applied", "a config without the annotation is not the operators"])
def test_the_applied_hash_counts_only_while_the_config_hashes_to_it(annotation, config, held):
    assert applied_hash(_rayservice(annotation, config)) == held


def groups(*specs):
    return {"spec": {"workerGroupSpecs": [dict(groupName=n, **b) for n, b in specs]}}


def service(*specs):
    return {"spec": {"rayClusterConfig": groups(*specs)["spec"]}}


BOUNDS_CASES = [
    ("a cluster whose bounds match the RayService's is left alone",
     service(("workers", {"minReplicas": 1, "maxReplicas": 4})), groups(("workers", {"minReplicas": 1, "maxReplicas": 4})), []),
    ("a raised maxReplicas reaches the cluster, guarded by the group's name",
     service(("workers", {"minReplicas": 1, "maxReplicas": 8})), groups(("workers", {"minReplicas": 1, "maxReplicas": 4})),
     [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "workers"},
      {"op": "add", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": 8}]),
    ("groups are matched by name, not by position",
     service(("gpu", {"minReplicas": 2}), ("cpu", {"minReplicas": 0})), groups(("cpu", {"minReplicas": 0}), ("gpu", {"minReplicas": 1})),
     [{"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "gpu"},
      {"op": "add", "path": "/spec/workerGroupSpecs/1/minReplicas", "value": 2}]),
    ("a bound the cluster lacks is added",
     service(("workers", {"minReplicas": 0})), groups(("workers", {})),
     [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "workers"},
      {"op": "add", "path": "/spec/workerGroupSpecs/0/minReplicas", "value": 0}]),
    ("a bound the RayService does not set is not touched",
     service(("workers", {})), groups(("workers", {"minReplicas": 3})), []),
    ("a cluster group the RayService no longer has is not touched",
     service(("workers", {"maxReplicas": 2})), groups(("old", {"maxReplicas": 9})), []),
]


@pytest.mark.parametrize("sentence, rayservice, raycluster, expected", BOUNDS_CASES, ids=[c[0] for c in BOUNDS_CASES])
def test_worker_bounds_patch(sentence, rayservice, raycluster, expected):
    assert worker_bounds_patch(rayservice, raycluster) == expected
