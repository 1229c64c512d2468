"""How the operator reads a RayService's status as KubeRay v1.5 writes it (a pure table):
the stand-in CRD never had a pending cluster, so first installs and upgrades were misread."""

from __future__ import annotations

import pytest

from deltafleet.operator.backend_rayservice import application_statuses


def rs(active=None, pending=None, generation=2, observed=2, active_cluster="pool-abc", pending_cluster=None):
    def service(apps, cluster):
        return {**({"rayClusterName": cluster} if cluster else {}),
                "applicationStatuses": {n: {"status": s, "message": m} for n, (s, m) in (apps or {}).items()}}
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": observed, "activeServiceStatus": service(active, active_cluster),
                       "pendingServiceStatus": service(pending, pending_cluster)}}


CASES = [
    ("KubeRay has not observed the latest spec: nothing is reported",
     rs(active={"llama": ("RUNNING", "")}, observed=1), {}),
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
