"""The rayservice backend against KubeRay's real RayService CRD: the operator writes the whole
multi-application config into spec.serveConfigV2; this test plays KubeRay and reports the
applications RUNNING in the RayService status."""

import json

import pytest
import yaml
from op_harness import RAY_NS, FineTunes, finetune_yaml, wait_for

from deltafleet.operator.serveconfig import tenants_of_application

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def rayservice_obj(k8s, name):
    return json.loads(k8s.kubectl("-n", RAY_NS, "get", "rayservice", name, "-o", "json").stdout)


def serve_config(k8s, name) -> dict:
    return yaml.safe_load(rayservice_obj(k8s, name)["spec"].get("serveConfigV2") or "{}") or {}


def apps_by_name(config) -> dict:
    return {a["name"]: a for a in config.get("applications") or []}


def report_running(k8s, name, pools):
    """What KubeRay writes once the active cluster serves the config it has observed."""
    rs = rayservice_obj(k8s, name)
    status = {"observedGeneration": rs["metadata"]["generation"], "serviceStatus": "Running",
              "activeServiceStatus": {"applicationStatuses": {p: {"status": "RUNNING", "message": ""} for p in pools}}}
    k8s.kubectl("-n", RAY_NS, "patch", "rayservice", name, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": status}))


def test_pools_in_serve_config_v2(k8s, namespace, run_operator, rayservice, store, tmp_path):
    op = run_operator(namespace, "rayservice")
    fts = FineTunes(k8s, namespace, tmp_path)
    for name, base in (("a1", "bases/tiny"), ("a2", "bases/tiny"), ("b1", "bases/tiny-b")):
        fts.apply(finetune_yaml(name, namespace, base=base))
    for name in ("a1", "a2", "b1"):
        fts.wait_condition(name, "Compressed", "True", 600, log=op.log)
    pool_a, pool_b = fts.get("a1")["status"]["pool"], fts.get("b1")["status"]["pool"]
    assert fts.get("a2")["status"]["pool"] == pool_a != pool_b

    # Two FineTunes on one base: one application with two tenants; another base: another one.
    def config_has_all():
        apps = apps_by_name(serve_config(k8s, rayservice))
        return apps if set(apps) == {pool_a, pool_b} and len(tenants_of_application(apps[pool_a])) == 2 else None
    apps = wait_for(config_has_all, 120, "both pools in serveConfigV2", on_timeout=op.log)
    assert tenants_of_application(apps[pool_a]) == {
        f"{namespace}/{n}": {"uri": f"file://{store}/deltas/{namespace}/{n}/g1/delta.safetensors"} for n in ("a1", "a2")}
    assert set(tenants_of_application(apps[pool_b])) == {f"{namespace}/b1"}
    assert apps[pool_a]["args"]["base_model"] == f"{store}/bases/tiny"
    assert apps[pool_b]["args"]["base_model"] == f"{store}/bases/tiny-b"
    assert apps[pool_a]["route_prefix"] == f"/{pool_a}"
    assert fts.condition("a1", "Served")["reason"] == "ConfigApplied"  # KubeRay has not reported yet

    # KubeRay reports both applications RUNNING: every tenant is Served and Ready.
    report_running(k8s, rayservice, [pool_a, pool_b])
    for name, pool in (("a1", pool_a), ("a2", pool_a), ("b1", pool_b)):
        ft = fts.wait_condition(name, "Ready", "True", 60, log=op.log)
        assert ft["status"]["endpoint"] == f"http://{rayservice}-serve-svc.{RAY_NS}.svc:8000/{pool}/v1"

    # Deleting one tenant leaves the other pool's application byte-for-byte untouched.
    before_b = apps[pool_b]
    k8s.kubectl("-n", namespace, "delete", "finetune", "a1", "--wait=false")
    wait_for(lambda: fts.get("a1") is None, 120, "FineTune a1 to disappear", on_timeout=op.log)
    apps = apps_by_name(serve_config(k8s, rayservice))
    assert set(tenants_of_application(apps[pool_a])) == {f"{namespace}/a2"}
    assert apps[pool_b] == before_b
    annotations = rayservice_obj(k8s, rayservice)["metadata"]["annotations"]
    assert "deltafleet.dev/serve-config-hash" in annotations
