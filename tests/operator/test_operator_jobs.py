"""Compression Jobs against the real control plane (rayservice backend; no Ray needed):
exactly one Job when the operator dies right after creating it, and retries with backoff
then Failed with the pod's own reason; a deletion the serve backend cannot complete still
finishes after bounded retries."""

import json

import pytest
from op_harness import RAY_NS, RAYSERVICE, SYSTEM_NS, FineTunes, create_store_claim, finetune_yaml, free_port, wait_for

from deltafleet.operator.decisions import parse_time
from deltafleet.operator.settings import EXIT_HOOK_ENV

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_killed_after_job_creation_restarts_into_one_job(k8s, namespace, run_operator, rayservice, tmp_path):
    fts = FineTunes(k8s, namespace, tmp_path)
    first = run_operator(namespace, "rayservice", env={EXIT_HOOK_ENV: "1"})
    fts.apply(finetune_yaml("crash", namespace))
    assert first.wait_exit(120) == 3, first.log()
    assert fts.job_names() == ["crash-compress-g1"]
    assert "job" not in (fts.get("crash").get("status") or {})  # it died before recording the Job

    second = run_operator(namespace, "rayservice")
    ft = fts.wait_condition("crash", "Compressed", "True", 420, log=second.log)
    assert fts.job_names() == ["crash-compress-g1"]
    assert ft["status"]["job"] == "crash-compress-g1"


def test_failing_job_retries_with_backoff_then_fails_with_the_pods_reason(k8s, namespace, run_operator, rayservice, tmp_path):
    op = run_operator(namespace, "rayservice", "--retry-base-seconds", "3")
    fts = FineTunes(k8s, namespace, tmp_path)
    fts.apply(finetune_yaml("broken", namespace, finetuned="finetunes/does-not-exist", backoff_limit=1))
    ft = fts.wait_condition("broken", "Compressed", "False", 300, reason="BackoffLimitExceeded", log=op.log)
    assert ft["status"]["phase"] == "Failed"
    assert ft["status"]["retries"] == 2
    message = ft["status"]["conditions"][0]["message"]
    assert "all 2 attempts failed" in message and "exit code" in message and "does-not-exist" in message, message
    jobs = {j["metadata"]["name"]: j for j in fts.jobs()}
    assert sorted(jobs) == ["broken-compress-g1", "broken-compress-g1-r1"]
    # The retry waited for the backoff (3 s) after the first attempt failed (the Job controller's
    # earliest failure condition; timestamps are whole seconds, the bound is exact).
    failed_at = min(parse_time(c["lastTransitionTime"]) for c in jobs["broken-compress-g1"]["status"]["conditions"]
                    if c["type"] in ("Failed", "FailureTarget") and c["status"] == "True")
    assert parse_time(jobs["broken-compress-g1-r1"]["metadata"]["creationTimestamp"]) >= failed_at + 3
    assert "JobFailedRetrying" in fts.event_reasons("broken")
    assert "BackoffLimitExceeded" in fts.event_reasons("broken")
    assert not ft["status"].get("delta")
    assert fts.condition("broken", "Ready")["status"] == "False"


def test_deletion_with_the_serve_backend_down_still_finishes(k8s, namespace, run_operator, tmp_path):
    """The finalizer's cleanup fails on every attempt (nothing listens at the Ray address):
    after its bounded retries the finalizer goes anyway, with a Warning, not stuck Terminating."""
    dead = f"http://127.0.0.1:{free_port()}"
    op = run_operator(namespace, "ray-api", "--ray-dashboard-url", dead, "--serve-url", dead)
    fts = FineTunes(k8s, namespace, tmp_path)
    # Refused by the operator, so no Job: only the finalizer matters here. (The API server accepts
    # it: the model name equals the pool the operator derives from the base, which CEL cannot know.)
    from deltafleet.operator.api import ModelSource, derive_pool

    fts.apply(finetune_yaml("orphan", namespace, model_name=derive_pool(ModelSource(path="bases/tiny"))))
    fts.wait_condition("orphan", "Compressed", "False", 60, reason="InvalidSpec", log=op.log)
    assert fts.get("orphan")["metadata"]["finalizers"] == ["deltafleet.dev/finalizer"]
    k8s.kubectl("-n", namespace, "delete", "finetune", "orphan", "--wait=false")
    wait_for(lambda: fts.get("orphan") is None, 120, "FineTune orphan to disappear", on_timeout=op.log)
    warnings = json.loads(k8s.kubectl("-n", namespace, "get", "events", "--field-selector",
                                      "involvedObject.name=orphan,reason=FinalizerDropped", "-o", "json").stdout)["items"]
    assert warnings and warnings[0]["type"] == "Warning", warnings
    assert "after 3 attempts" in warnings[0]["message"] and dead in warnings[0]["message"], warnings[0]["message"]
    assert fts.job_names() == []


@pytest.mark.parametrize("backend, account", [("ray-api", "deltafleet"), ("rayservice", "deltafleet-rs")])
def test_operators_run_as_the_charts_service_account(k8s, namespace, chart, rayservice_crd, backend, account):
    """Every operator above runs with `chart[backend]`: the chart's ServiceAccount and RBAC, not admin."""
    kubeconfig = chart[backend]
    whoami = k8s.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kubeconfig).stdout
    assert whoami == f"system:serviceaccount:{SYSTEM_NS}:{account}"

    def can(*args) -> bool:
        return k8s.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False).stdout.strip() == "yes"

    assert can("-n", namespace, "create", "jobs.batch") and can("-n", namespace, "patch", "finetunes.deltafleet.dev/status")
    assert not can("*", "*", "--all-namespaces")
    assert not can("create", "clusterrolebindings")
    assert can("-n", namespace, "get", "secrets")  # API keys: the Secret a FineTune names ...
    assert not can("-n", namespace, "list", "secrets") and not can("-n", namespace, "watch", "secrets")  # ... never all
    assert not can("-n", namespace, "delete", "pods")
    if backend == "rayservice":  # one named RayService, nothing else of KubeRay's
        assert can("-n", RAY_NS, "patch", f"rayservices.ray.io/{RAYSERVICE}")
        assert not can("-n", RAY_NS, "patch", "rayservices.ray.io/another")


def test_a_compression_pod_that_cannot_start_shows_why_in_the_status(k8s, namespace, run_operator, rayservice, tmp_path):
    """A token Secret that does not exist: the kubelet keeps the container
    waiting with CreateContainerConfigError and the Job never fails by itself. The FineTune
    says so within seconds, not "compressing" until its deadline."""
    op = run_operator(namespace, "rayservice")
    fts = FineTunes(k8s, namespace, tmp_path)
    body = finetune_yaml("nosecret", namespace).replace(
        "baseModel: {path: bases/tiny}", "baseModel: {huggingFace: org/tiny, tokenSecretRef: {name: missing-hf-token}}")
    fts.apply(body)
    ft = fts.wait_condition("nosecret", "Compressed", "False", 60, reason="PodCannotStart", log=op.log)
    message = fts.condition("nosecret", "Compressed")["message"]
    assert "CreateContainerConfigError" in message and "missing-hf-token" in message, message
    assert ft["status"]["phase"] != "Failed"  # not given up on: creating the Secret lets it start
    assert "PodCannotStart" in fts.event_reasons("nosecret")


def test_a_spec_the_policy_refuses_gets_no_job_and_says_which_policy(k8s, namespace, run_operator, rayservice, ml_job_image, tmp_path):
    port = free_port()
    op = run_operator(namespace, "rayservice", metrics_port=port)
    fts = FineTunes(k8s, namespace, tmp_path)
    fts.apply(finetune_yaml("miner", namespace).replace("    gpus: 0\n", "    gpus: 0\n    image: evil/miner:1\n"))
    ft = fts.wait_condition("miner", "Compressed", "False", 60, reason="RefusedByPolicy", log=op.log)
    message = fts.condition("miner", "Compressed")["message"]
    assert "'evil/miner:1' is not an allowed image" in message and ml_job_image in message, message
    assert fts.job_names() == []
    assert "RefusedByPolicy" in fts.event_reasons("miner")
    assert ft["status"]["phase"] == "Failed"
    # ... and the operator's Prometheus metrics say so
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['deltafleet_operator_reconciles_total{result="refused"}'] >= 1
    assert samples['deltafleet_operator_finetunes{phase="Failed"}'] == 1
    assert samples["deltafleet_operator_reconcile_seconds_count"] >= 1
    assert samples.get('deltafleet_operator_jobs_total{outcome="created"}', 0) == 0


def test_compression_pods_are_admitted_in_a_namespace_enforcing_the_restricted_profile(k8s, namespace, run_operator, rayservice, tmp_path):
    """Pod Security admission (in the API server) with enforce=restricted: the Job's pod, with a
    claim for its store, is admitted. The same Job with a hostPath store is not — the check has teeth."""
    k8s.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    op = run_operator(namespace, "rayservice")  # its default store is a hostPath
    # The claim exists (else the operator makes no Job: ModelStoreMissing, test_operator_store.py).
    create_store_claim(k8s, namespace)
    fts = FineTunes(k8s, namespace, tmp_path)
    fts.apply(finetune_yaml("claimed", namespace).replace("  backoffLimit:", "  modelStore: {claimName: models}\n  backoffLimit:"))
    fts.apply(finetune_yaml("hostpath", namespace))

    def pods(job):
        out = k8s.kubectl("-n", namespace, "get", "pods", "-l", f"batch.kubernetes.io/job-name={job}", "-o", "json")
        return json.loads(out.stdout)["items"]

    wait_for(lambda: pods("claimed-compress-g1"), 120, "the claimed store's pod to be admitted", on_timeout=op.log)

    def refused():
        out = k8s.kubectl("-n", namespace, "get", "events", "--field-selector", "involvedObject.name=hostpath-compress-g1", "-o", "json")
        return [e for e in json.loads(out.stdout)["items"] if e["reason"] == "FailedCreate" and "PodSecurity" in e["message"]]
    events = wait_for(refused, 120, "the hostPath Job's pod to be refused by Pod Security", on_timeout=op.log)
    assert "hostPath" in events[0]["message"]
    assert not pods("hostpath-compress-g1")
