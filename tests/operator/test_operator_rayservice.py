"""The rayservice backend against KubeRay's real RayService CRD: the operator writes the whole
multi-application config into spec.serveConfigV2; this test plays KubeRay and reports the
applications RUNNING in the RayService status.

No Ray Serve runs here, so the replicas' tenant-status route (GET <serve url>/<pool>/-/tenants)
is played too: --serve-url points at a real HTTP server on loopback that first does not exist
(the operator must say so: Served=False, never Ready) and then answers as replicas with
`auth: keys` do, to the status key whose digest the operator wrote into serveConfigV2 only."""

import json

import pytest
import yaml
from fake_replica import FakeReplicas, keyed
from conftest import render_pool
from op_harness import RAY_NS, FineTunes, finetune_yaml, free_port, wait_for

from deltafleet.operator.serveconfig import tenants_of_application
from deltafleet.serving.config import key_digest

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
              "activeServiceStatus": {"rayClusterName": f"{name}-raycluster-abcde",
                                      "applicationStatuses": {p: {"status": "RUNNING", "message": ""} for p in pools}}}
    k8s.kubectl("-n", RAY_NS, "patch", "rayservice", name, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": status}))


def test_pools_in_serve_config_v2(k8s, namespace, run_operator, rayservice, store, tmp_path):
    """Three FineTunes on two bases through KubeRay's RayService, one focused check per step
    (the functions below), in order."""
    key_file = tmp_path / "status-key"
    key_file.write_text("pool-status-key\n")
    serve_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there yet
    op = run_operator(namespace, "rayservice", "--serve-url", serve_url, "--serve-status-key-file", str(key_file))
    fts = FineTunes(k8s, namespace, tmp_path)
    for name, base in (("a1", "bases/tiny"), ("a2", "bases/tiny"), ("b1", "bases/tiny-b")):
        fts.apply(finetune_yaml(name, namespace, base=base))
    for name in ("a1", "a2", "b1"):
        fts.wait_condition(name, "Compressed", "True", 600, log=op.log)
    pool_a, pool_b = fts.get("a1")["status"]["pool"], fts.get("b1")["status"]["pool"]
    assert fts.get("a2")["status"]["pool"] == pool_a != pool_b

    apps, digests = _one_application_per_base_with_its_tenants(k8s, rayservice, fts, op, namespace, store, pool_a, pool_b)
    _a_running_application_without_a_replicas_report_serves_no_one(k8s, rayservice, fts, op, serve_url, pool_a, pool_b)
    _the_replicas_reports_decide_served(fts, op, namespace, serve_url, digests, pool_a, pool_b)
    _deleting_one_tenant_leaves_the_other_pool_untouched(k8s, rayservice, fts, op, namespace, apps, pool_a, pool_b)
    _a_recreated_rayservice_gets_the_config_again(k8s, rayservice, op)


def _one_application_per_base_with_its_tenants(k8s, rayservice, fts, op, namespace, store, pool_a, pool_b):
    """Two FineTunes on one base: one application with two tenants; another base: another one.
    Returns (the applications, each pool's status key digest)."""
    def config_has_all():
        apps = apps_by_name(serve_config(k8s, rayservice))
        return apps if set(apps) == {pool_a, pool_b} and len(tenants_of_application(apps[pool_a])) == 2 else None
    apps = wait_for(config_has_all, 120, "both pools in serveConfigV2", on_timeout=op.log)
    assert tenants_of_application(apps[pool_a]) == {
        f"{namespace}/{n}": {"uri": f"file://{store}/deltas/{namespace}/{n}/g1/delta.safetensors"} for n in ("a1", "a2")}
    # Every pool may be asked for its tenants' states with the status key: its digest, never the key.
    digests = {p: a["deployments"][0]["user_config"]["status_key_sha256"] for p, a in apps.items()}
    assert set(digests.values()) == {key_digest("pool-status-key")}
    assert "pool-status-key" not in rayservice_obj(k8s, rayservice)["spec"]["serveConfigV2"]
    assert set(tenants_of_application(apps[pool_b])) == {f"{namespace}/b1"}
    assert apps[pool_a]["args"]["base_model"] == f"{store}/bases/tiny"
    assert apps[pool_b]["args"]["base_model"] == f"{store}/bases/tiny-b"
    assert apps[pool_a]["route_prefix"] == f"/{pool_a}"
    assert fts.condition("a1", "Served")["reason"] == "ConfigApplied"  # KubeRay has not reported yet
    return apps, digests


def _a_running_application_without_a_replicas_report_serves_no_one(k8s, rayservice, fts, op, serve_url, pool_a, pool_b):
    """KubeRay reports both applications RUNNING, but no replica answers for its tenants: a
    running application alone is not a served tenant."""
    report_running(k8s, rayservice, [pool_a, pool_b])
    for name in ("a1", "a2", "b1"):
        ft = fts.wait_condition(name, "Served", "False", 60, reason="ReplicaStatusUnavailable", log=op.log)
        assert f"GET {serve_url}/" in fts.condition(name, "Served")["message"]
        assert fts.condition(name, "Ready")["status"] == "False" and not ft["status"].get("endpoint")


def _the_replicas_reports_decide_served(fts, op, namespace, serve_url, digests, pool_a, pool_b):
    """The replicas answer (as with auth: keys: only the digest in serveConfigV2 reads them):
    a1 ready, a2 still loading, b1's delta failed to load; then every one ready."""
    states = {pool_a: {f"{namespace}/a1": {"state": "ready", "error": None}, f"{namespace}/a2": {"state": "loading", "error": None}},
              pool_b: {f"{namespace}/b1": {"state": "failed", "error": "/models/deltas/b1/g1/delta.safetensors: No such file"}}}
    replicas = FakeReplicas(keyed(states.get, digests.get), port=int(serve_url.rsplit(":", 1)[1]))
    try:
        ft = fts.wait_condition("a1", "Ready", "True", 60, log=op.log)
        assert ft["status"]["endpoint"] == f"{serve_url}/{pool_a}/v1"
        fts.wait_condition("a2", "Served", "False", 60, reason="TenantLoading", log=op.log)
        fts.wait_condition("b1", "Served", "False", 60, reason="TenantLoadFailed", log=op.log)
        assert fts.condition("b1", "Served")["message"] == (
            f"model '{namespace}/b1' failed to load in application '{pool_b}': "
            "/models/deltas/b1/g1/delta.safetensors: No such file")
        assert fts.condition("b1", "Ready")["status"] == "False" and "TenantLoadFailed" in fts.event_reasons("b1")
        assert {auth for _, auth in replicas.seen} == {"Bearer pool-status-key"}

        # Loaded at last (b1: its replica read a good delta): every tenant Served and Ready.
        states[pool_a][f"{namespace}/a2"] = {"state": "ready", "error": None}
        states[pool_b][f"{namespace}/b1"] = {"state": "ready", "error": None}
        for name, pool in (("a1", pool_a), ("a2", pool_a), ("b1", pool_b)):
            ft = fts.wait_condition(name, "Ready", "True", 60, log=op.log)
            assert ft["status"]["endpoint"] == f"{serve_url}/{pool}/v1"
    finally:
        replicas.close()


def _deleting_one_tenant_leaves_the_other_pool_untouched(k8s, rayservice, fts, op, namespace, apps, pool_a, pool_b):
    """Deleting one tenant leaves the other pool's application byte-for-byte untouched."""
    before_b = apps[pool_b]
    k8s.kubectl("-n", namespace, "delete", "finetune", "a1", "--wait=false")
    wait_for(lambda: fts.get("a1") is None, 120, "FineTune a1 to disappear", on_timeout=op.log)
    apps = apps_by_name(serve_config(k8s, rayservice))
    assert set(tenants_of_application(apps[pool_a])) == {f"{namespace}/a2"}
    assert apps[pool_b] == before_b
    annotations = rayservice_obj(k8s, rayservice)["metadata"]["annotations"]
    assert "deltafleet.dev/serve-config-hash" in annotations


def _a_recreated_rayservice_gets_the_config_again(k8s, rayservice, op):
    """The RayService deleted and recreated (KubeRay's recovery step, or a person): it comes back
    without the config, and is re-applied though no FineTune changed."""
    applied = serve_config(k8s, rayservice)
    k8s.kubectl("-n", RAY_NS, "delete", "rayservice", rayservice)
    k8s.kubectl("create", "--validate=strict", "-f", "-", input=render_pool(k8s, rayservice, RAY_NS))
    assert serve_config(k8s, rayservice) == {}
    wait_for(lambda: serve_config(k8s, rayservice) == applied, 60, "the config re-applied to the recreated RayService",
             on_timeout=op.log)
