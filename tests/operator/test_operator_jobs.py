"""Compression Jobs against the real control plane (rayservice backend; no Ray needed):
exactly one Job when the operator dies right after creating it, and retries with backoff
then Failed with the pod's own reason."""

import pytest
from op_harness import FineTunes, finetune_yaml, wait_for

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
    op = run_operator(namespace, "rayservice")
    fts = FineTunes(k8s, namespace, tmp_path)
    fts.apply(finetune_yaml("broken", namespace, finetuned="finetunes/does-not-exist", backoff_limit=1))
    ft = fts.wait_condition("broken", "Compressed", "False", 300, reason="BackoffLimitExceeded", log=op.log)
    assert ft["status"]["phase"] == "Failed"
    assert ft["status"]["retries"] == 2
    message = ft["status"]["conditions"][0]["message"]
    assert "all 2 attempts failed" in message and "exit code" in message and "does-not-exist" in message, message
    jobs = {j["metadata"]["name"]: j for j in fts.jobs()}
    assert sorted(jobs) == ["broken-compress-g1", "broken-compress-g1-r1"]
    first_failed = next(c for c in jobs["broken-compress-g1"]["status"]["conditions"] if c["type"] == "Failed")
    # The retry waited for the backoff after the first failure.
    assert jobs["broken-compress-g1-r1"]["metadata"]["creationTimestamp"] >= first_failed["lastTransitionTime"]
    assert "JobFailedRetrying" in fts.event_reasons("broken")
    assert "BackoffLimitExceeded" in fts.event_reasons("broken")
    assert not ft["status"].get("delta")
    assert fts.condition("broken", "Ready")["status"] == "False"
