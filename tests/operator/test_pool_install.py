"""One install brings up the serving pool: `helm install` with pool values renders a RayService
that KubeRay's own CRD (v1.5) accepts under strict validation; the operator, as that release's
ServiceAccount, compresses a FineTune and writes its tenant into that object's serveConfigV2;
`helm upgrade` changes the pool and leaves the tenants alone. No KubeRay controller runs here
(no pods start): what is checked is the API contract KubeRay reads."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import render_pool
from op_harness import CHART as CHART_PATH
from op_harness import FineTunes, OperatorProcess, finetune_yaml, wait_for

from cluster.fixtures import NO_CHART_OPERATOR

from deltafleet.operator.images import RAY_VERSION
from deltafleet.operator.serveconfig import tenants_of_application

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RELEASE, SYSTEM, POOL_NAME = "fleet", "fleet-system", "fleet-pool"
SA = f"{RELEASE}-deltafleet"


def test_kuberays_crd_accepts_the_rendered_pool_and_refuses_a_typo(k8s, rayservice_crd):
    k8s.create_namespace("pool-dry-run")
    manifest = render_pool(k8s, "dry-run", "pool-dry-run", "pool.workers.gpus=2", "pool.workers.acceleratorType=NVIDIA-H100-80GB-HBM3",
                           "pool.hfTokenSecret.name=hf")
    out = k8s.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest)
    assert "rayservice.ray.io/dry-run created (server dry run)" in out.stdout
    # The same check refuses what KubeRay's schema does not know, so the pass above means something.
    doc = yaml.safe_load(manifest)
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # typo of rayStartParams
    bad = k8s.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert bad.returncode != 0 and "rayStartParam" in bad.stderr


def rayservice(k8s) -> dict:
    return json.loads(k8s.kubectl("-n", SYSTEM, "get", "rayservice", POOL_NAME, "-o", "json").stdout)


def test_helm_install_with_a_pool_serves_a_finetune_through_it(k8s, chart, rayservice_crd, store, ml_job_image, namespace, tmp_path):
    k8s.create_namespace(SYSTEM)
    k8s.helm("install", RELEASE, CHART_PATH, "-n", SYSTEM, *NO_CHART_OPERATOR, "--set", "crds.enabled=false", "--set", "tests.enabled=false",
             "--set", "pool.create=true", "--set", f"serve.rayService.name={POOL_NAME}", "--set", "serve.auth=none",
             "--set", f"modelStore.hostPath={store}", "--set", "pool.workers.maxReplicas=2")
    try:
        rs = rayservice(k8s)
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == RAY_VERSION
        assert not rs["spec"].get("serveConfigV2")

        # The operator as the release's own ServiceAccount (its RBAC: this one RayService).
        op = OperatorProcess(k8s.sa_kubeconfig(SYSTEM, SA), [
            "--serve-backend", "rayservice", "--rayservice-name", POOL_NAME, "--rayservice-namespace", SYSTEM,
            "-n", namespace, "--serve-auth", "none", "--metrics-port", "0",
            "--store-host-path", str(store), "--operator-store-path", str(store), "--replica-store-path", "/models",
            "--job-image", ml_job_image, "--resync-seconds", "1", "--retry-base-seconds", "1",
        ], tmp_path).start()
        try:
            fts = FineTunes(k8s, namespace, tmp_path)
            fts.apply(finetune_yaml("chat", namespace))
            fts.wait_condition("chat", "Compressed", "True", 600, log=op.log)

            def tenants():
                config = yaml.safe_load(rayservice(k8s)["spec"].get("serveConfigV2") or "{}") or {}
                apps = config.get("applications") or []
                return apps and tenants_of_application(apps[0])
            held = wait_for(tenants, 120, "the tenant in the pool's serveConfigV2", on_timeout=op.log)
            # Replicas see the store where the chart mounts it (modelStore.replicaPath).
            assert held == {f"{namespace}/chat": {"uri": f"file:///models/deltas/{namespace}/chat/g1/delta.safetensors"}}
            before = rayservice(k8s)["spec"]["serveConfigV2"]
        finally:
            op.stop()

        # An upgrade that changes the pool keeps what the operator wrote.
        k8s.helm("upgrade", RELEASE, CHART_PATH, "-n", SYSTEM, "--reuse-values", "--set", "pool.workers.maxReplicas=5")
        after = rayservice(k8s)
        assert after["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 5
        assert after["spec"]["serveConfigV2"] == before
    finally:
        k8s.helm("uninstall", RELEASE, "-n", SYSTEM, check=False)

