"""The whole path against the real test control plane and a real local Ray (ray-api backend):
kubectl apply -> Job -> the real `deltafleet compress` -> Compressed -> serve config on Ray
-> an HTTP completion -> serving change without recompression -> quality gate -> delete."""

import pytest
from op_harness import FineTunes, finetune_yaml, http_json, wait_for

from deltafleet.operator.serveconfig import tenants_of_application

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]


def test_finetune_to_served_tenant_and_back(k8s, namespace, run_operator, local_ray, store, tmp_path):
    op = run_operator(namespace, "ray-api", ray=local_ray, auth="keys")
    fts = FineTunes(k8s, namespace, tmp_path)
    k8s.kubectl("-n", namespace, "create", "secret", "generic", "bot-keys", "--from-literal=ci=key-1")
    fts.apply(finetune_yaml("bot", namespace, pool="tiny", api_key_secret="bot-keys"))
    # A "fine-tune" that learned nothing (the base's own weights): it retains 0% of a zero
    # improvement, deterministically below any gate, whatever the eval sample's noise.
    fts.apply(finetune_yaml("strict", namespace, pool="tiny", finetuned="bases/tiny-b", min_fidelity=0.5))

    # The Job of generation 1, as the operator built it.
    job = wait_for(lambda: next((j for j in fts.jobs() if j["metadata"]["name"] == "bot-compress-g1"), None), 60,
                   "Job bot-compress-g1", on_timeout=op.log)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTune", "bot", True)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 600
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert container["command"] == ["deltafleet", "compress"]
    assert args[args.index("--base") + 1] == "/models/bases/tiny"
    assert args[args.index("--out") + 1] == f"/models/deltas/{namespace}/bot/g1"
    assert args[args.index("--steps") + 1] == "2"
    assert args[args.index("--calibration") + 1] == "/models/data/cal.txt"
    assert container["image"] == "deltafleet-ml:test"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in container["env"]
    assert {"name": "model-store", "hostPath": {"path": str(store), "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]

    # Compressed, with the figures of the real run.
    ft = fts.wait_condition("bot", "Compressed", "True", 420, log=op.log)
    delta = ft["status"]["delta"]
    path = store / "deltas" / namespace / "bot" / "g1" / "delta.safetensors"
    assert delta["uri"] == f"file:///models/deltas/{namespace}/bot/g1/delta.safetensors"
    assert delta["bytes"] == path.stat().st_size
    assert delta["compressionRatio"] > 1
    assert delta["fidelity"]["retainedImprovement"] >= 0.0

    # The quality gate: compressed, but below its minFidelity: never served.
    strict = fts.wait_condition("strict", "Compressed", "False", 420, reason="FidelityBelowThreshold", log=op.log)
    assert strict["status"]["phase"] == "Rejected"

    # Served on the local Ray, Ready, and answering.
    ft = fts.wait_condition("bot", "Ready", "True", 420, log=lambda: op.log() + "\n" + str(local_ray.applications()))
    app = local_ray.applications()["tiny"]
    from deltafleet.serving.config import key_digest

    assert tenants_of_application(app["deployed_app_config"]) == {
        f"{namespace}/bot": {"uri": f"file://{store}/deltas/{namespace}/bot/g1/delta.safetensors", "key_sha256": [key_digest("key-1")]}}
    assert ft["status"]["endpoint"] == f"{local_ray.serve_url}/tiny/v1"
    assert ft["status"]["modelName"] == f"{namespace}/bot"
    assert ft["status"]["phase"] == "Serving"
    request = {"model": f"{namespace}/bot", "prompt": "def main(", "max_tokens": 4, "temperature": 0}
    code, body = http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-1")
    assert code == 200, body
    assert body["model"] == f"{namespace}/bot" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] >= 1
    reasons = fts.event_reasons("bot")
    assert {"JobCreated", "DeltaReady", "ApplicationRunning", "Ready"} <= set(reasons), reasons
    assert "FidelityBelowThreshold" in fts.event_reasons("strict")

    # API keys: only the Secret's keys get in; the pool's config holds their digests, not them.
    assert http_json("POST", ft["status"]["endpoint"] + "/completions", request)[0] == 401
    assert http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-2")[0] == 401
    assert "key-1" not in str(local_ray.applications()["tiny"])
    # Rotation: edit the Secret; within a resync the new key works and the old one stops.
    k8s.kubectl("-n", namespace, "patch", "secret", "bot-keys", "--type=merge", "-p", '{"stringData": {"ci": "key-2"}}')
    wait_for(lambda: http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-2")[0] == 200, 120,
             "the rotated key to work", on_timeout=op.log)
    assert http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-1")[0] == 401
    fts.wait_condition("bot", "Ready", "True", 120, log=op.log)  # Ray reports the app updating while it reconfigures

    # A serving change is a new generation but no new Job: only the serve config changes.
    fts.patch("bot", {"spec": {"serving": {"maxReplicas": 2}}})
    wait_for(lambda: local_ray.applications()["tiny"]["deployed_app_config"]["deployments"][0]
             ["autoscaling_config"]["max_replicas"] == 2, 120, "max_replicas 2 on Ray", on_timeout=op.log)
    fts.wait_condition("bot", "Ready", "True", 120, log=op.log)
    assert fts.get("bot")["status"]["observedGeneration"] == 2
    assert fts.job_names() == ["bot-compress-g1", "strict-compress-g1"]

    # Delete: out of Ray, files gone (deletionPolicy Delete), the object gone.
    k8s.kubectl("-n", namespace, "delete", "finetune", "bot", "--wait=false")
    wait_for(lambda: fts.get("bot") is None, 120, "FineTune bot to disappear", on_timeout=op.log)
    # Its only served tenant left, so the pool goes: the config without it was applied before
    # the finalizer let go (Ray is deleting it or done), and Ray then drops the application.
    assert local_ray.applications().get("tiny", {"status": "DELETING"})["status"] == "DELETING"
    wait_for(lambda: "tiny" not in local_ray.applications(), 60, "Ray to delete application tiny")
    assert not path.parent.parent.exists()
    assert fts.get("strict") is not None


def test_a_token_protected_dashboard_is_refused_with_what_to_set(local_ray, tmp_path):
    # Ray 2.60 turns token authentication on for clusters it starts: without the token the
    # backend must say what to configure, not just "HTTP 401".
    from deltafleet.operator.backend import BackendError
    from deltafleet.operator.backend_rayapi import RayApiBackend

    with pytest.raises(BackendError, match=r"HTTP 401: .*--ray-auth-token-file"):
        RayApiBackend(local_ray.dashboard_url).statuses()
    missing = tmp_path / "no-token"
    with pytest.raises(BackendError, match=rf"Ray auth token file {missing}: No such file"):
        RayApiBackend(local_ray.dashboard_url, token_file=str(missing)).statuses()
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    with pytest.raises(BackendError, match=r"HTTP 403: .*was refused"):
        RayApiBackend(local_ray.dashboard_url, token_file=str(wrong)).statuses()
    assert isinstance(RayApiBackend(local_ray.dashboard_url, token_file=str(local_ray.token_file)).statuses(), dict)
