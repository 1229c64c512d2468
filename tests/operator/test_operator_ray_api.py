"""The whole path against the real test control plane and a real local Ray (ray-api backend):
kubectl apply -> Job -> the real `deltafleet compress` -> Compressed -> serve config on Ray
-> an HTTP completion -> serving change without recompression -> quality gate -> delete;
and a tenant whose delta the replicas cannot load is never Ready while its pool mate serves."""

import time
import uuid

import pytest
from op_harness import FineTunes, finetune_yaml, free_port, http_json, wait_for

from deltafleet.operator.serveconfig import tenants_of_application

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]


def _status_key(tmp_path) -> tuple[str, str]:
    """A pool status key in a file (the chart mounts a Secret): (key, path)."""
    key = f"status-{uuid.uuid4().hex}"
    (tmp_path / "status-key").write_text(key)
    return key, str(tmp_path / "status-key")


def test_finetune_to_served_tenant_and_back(k8s, namespace, run_operator, local_ray, store, ml_job_image, tmp_path):
    """The whole life of a FineTune, one focused check per step (the functions below), in order."""
    status_key, key_file = _status_key(tmp_path)
    op = run_operator(namespace, "ray-api", "--serve-status-key-file", key_file, ray=local_ray, auth="keys")
    fts = FineTunes(k8s, namespace, tmp_path)
    k8s.kubectl("-n", namespace, "create", "secret", "generic", "bot-keys", "--from-literal=ci=key-1")
    fts.apply(finetune_yaml("bot", namespace, pool="tiny", api_key_secret="bot-keys"))
    # A "fine-tune" that learned nothing (the base's own weights): it retains 0% of a zero
    # improvement, deterministically below any gate, whatever the eval sample's noise.
    fts.apply(finetune_yaml("strict", namespace, pool="tiny", finetuned="bases/tiny-b", min_fidelity=0.5))

    _the_job_is_built_as_the_finetune_asks(fts, op, namespace, store, ml_job_image)
    path = _it_is_compressed_with_the_figures_of_the_real_run(fts, op, namespace, store)
    _below_its_min_fidelity_a_delta_is_never_served(fts, op)
    ft, request = _it_is_served_on_ray_ready_and_answering(fts, op, local_ray, namespace, store)
    _only_the_secrets_keys_get_in_and_a_rotated_key_takes_over(k8s, fts, op, local_ray, namespace, ft, request, status_key)
    _a_serving_change_is_a_new_generation_but_no_new_job(fts, op, local_ray)
    _deleted_it_leaves_ray_and_the_store(k8s, fts, op, local_ray, namespace, path)


def _the_job_is_built_as_the_finetune_asks(fts, op, namespace, store, ml_job_image):
    """The Job of generation 1, as the operator built it."""
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
    assert container["image"] == ml_job_image
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in container["env"]
    assert {"name": "model-store", "hostPath": {"path": str(store), "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


def _it_is_compressed_with_the_figures_of_the_real_run(fts, op, namespace, store):
    """Compressed, with the figures of the real run; returns the delta file's path."""
    ft = fts.wait_condition("bot", "Compressed", "True", 420, log=op.log)
    delta = ft["status"]["delta"]
    path = store / "deltas" / namespace / "bot" / "g1" / "delta.safetensors"
    assert delta["uri"] == f"file:///models/deltas/{namespace}/bot/g1/delta.safetensors"
    assert delta["bytes"] == path.stat().st_size
    assert delta["compressionRatio"] > 1
    assert delta["fidelity"]["retainedImprovement"] >= 0.0
    return path


def _below_its_min_fidelity_a_delta_is_never_served(fts, op):
    """The quality gate: compressed, but below its minFidelity: never served."""
    strict = fts.wait_condition("strict", "Compressed", "False", 420, reason="FidelityBelowThreshold", log=op.log)
    assert strict["status"]["phase"] == "Rejected"


def _it_is_served_on_ray_ready_and_answering(fts, op, local_ray, namespace, store):
    """Served on the local Ray, Ready, and answering; returns (the FineTune, a completion request)."""
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
    return ft, request


def _only_the_secrets_keys_get_in_and_a_rotated_key_takes_over(k8s, fts, op, local_ray, namespace, ft, request, status_key):
    """API keys: only the Secret's keys get in; the pool's config holds their digests, not them."""
    assert http_json("POST", ft["status"]["endpoint"] + "/completions", request)[0] == 401
    assert http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-2")[0] == 401
    assert "key-1" not in str(local_ray.applications()["tiny"]) and status_key not in str(local_ray.applications()["tiny"])
    # Rotation: edit the Secret; within a resync the new key works and the old one stops.
    k8s.kubectl("-n", namespace, "patch", "secret", "bot-keys", "--type=merge", "-p", '{"stringData": {"ci": "key-2"}}')
    wait_for(lambda: http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-2")[0] == 200, 120,
             "the rotated key to work", on_timeout=op.log)
    assert http_json("POST", ft["status"]["endpoint"] + "/completions", request, token="key-1")[0] == 401
    fts.wait_condition("bot", "Ready", "True", 120, log=op.log)  # Ray reports the app updating while it reconfigures


def _a_serving_change_is_a_new_generation_but_no_new_job(fts, op, local_ray):
    """Only the serve config changes."""
    fts.patch("bot", {"spec": {"serving": {"maxReplicas": 2}}})
    wait_for(lambda: local_ray.applications()["tiny"]["deployed_app_config"]["deployments"][0]
             ["autoscaling_config"]["max_replicas"] == 2, 120, "max_replicas 2 on Ray", on_timeout=op.log)
    fts.wait_condition("bot", "Ready", "True", 120, log=op.log)
    assert fts.get("bot")["status"]["observedGeneration"] == 2
    assert fts.job_names() == ["bot-compress-g1", "strict-compress-g1"]


def _deleted_it_leaves_ray_and_the_store(k8s, fts, op, local_ray, namespace, path):
    """Delete: out of Ray, files gone (deletionPolicy Delete), the object gone."""
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


def test_a_tenant_whose_delta_cannot_be_loaded_is_never_ready_while_its_pool_mate_serves(
        k8s, namespace, run_operator, local_ray, store, tmp_path):
    status_key, key_file = _status_key(tmp_path)
    fts = FineTunes(k8s, namespace, tmp_path)
    for name in ("good", "gone"):
        k8s.kubectl("-n", namespace, "create", "secret", "generic", f"{name}-keys", f"--from-literal=ci=key-{name}")
        fts.apply(finetune_yaml(name, namespace, pool="pair", api_key_secret=f"{name}-keys"))
    # Compressed by an operator whose serve backend is down, so nothing is served before the
    # delta file goes; then an operator with the real Ray takes over.
    dead = f"http://127.0.0.1:{free_port()}"
    first = run_operator(namespace, "ray-api", "--ray-dashboard-url", dead, "--serve-url", dead,
                         "--serve-status-key-file", key_file, auth="keys")
    for name in ("good", "gone"):
        fts.wait_condition(name, "Compressed", "True", 420, log=first.log)
        fts.wait_condition(name, "Served", "False", 60, reason="BackendUnavailable", log=first.log)
    first.stop()
    delta = store / "deltas" / namespace / "gone" / "g1" / "delta.safetensors"
    delta.unlink()

    op = run_operator(namespace, "ray-api", "--serve-status-key-file", key_file, ray=local_ray, auth="keys")
    good = fts.wait_condition("good", "Ready", "True", 420, log=lambda: op.log() + "\n" + str(local_ray.applications()))
    request = {"model": f"{namespace}/good", "prompt": "def main(", "max_tokens": 2, "temperature": 0}
    code, body = http_json("POST", good["status"]["endpoint"] + "/completions", request, token="key-good")
    assert code == 200, body

    gone = fts.wait_condition("gone", "Served", "False", 120, reason="TenantLoadFailed", log=op.log)
    served = fts.condition("gone", "Served")
    assert served["message"].startswith(f"model '{namespace}/gone' failed to load in application 'pair': replica ")
    assert str(delta) in served["message"], served["message"]  # the replica's own error names the missing file
    assert gone["status"]["phase"] != "Serving" and fts.condition("gone", "Ready")["status"] == "False"
    assert "TenantLoadFailed" in fts.event_reasons("gone")
    # What the condition says is what its callers get: the replica refuses the tenant.
    request["model"] = f"{namespace}/gone"
    assert http_json("POST", f"{local_ray.serve_url}/pair/v1/completions", request, token="key-gone")[0] == 503

    # The replicas' tenant states need the status key: the pool's callers cannot list tenants.
    url = f"{local_ray.serve_url}/pair/-/tenants"
    assert http_json("GET", url)[0] == http_json("GET", url, token="key-good")[0] == 404
    code, states = http_json("GET", url, token=status_key)
    assert code == 200 and states["tenants"][f"{namespace}/good"]["state"] == "ready"
    assert states["tenants"][f"{namespace}/gone"]["state"] == "failed"

    # And it stays so over several resyncs: never Ready.
    time.sleep(4)
    assert fts.condition("gone", "Served")["reason"] == "TenantLoadFailed"
    assert fts.condition("gone", "Ready")["status"] == "False" and fts.condition("good", "Ready")["status"] == "True"
