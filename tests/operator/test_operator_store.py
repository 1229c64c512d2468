"""The model store across namespaces: a FineTune whose store claim is not in its namespace gets
`Compressed=False ModelStoreMissing` and no Job (a Job could only sit Pending, unmountable,
until its deadline); once the claim exists the Job is created at the next resync."""

from __future__ import annotations

import pytest
from op_harness import FineTunes, create_store_claim, finetune_yaml, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_a_missing_store_claim_is_named_and_no_job_runs_until_it_exists(k8s, namespace, run_operator, tmp_path):
    op = run_operator(namespace, "ray-api")
    fts = FineTunes(k8s, namespace, tmp_path)
    fts.apply(finetune_yaml("stored", namespace) + "  modelStore: {claimName: models}\n")
    fts.wait_condition("stored", "Compressed", "False", 60, reason="ModelStoreMissing", log=op.log)
    c = fts.condition("stored", "Compressed")
    assert f"PersistentVolumeClaim {namespace}/models" in c["message"]
    assert fts.get("stored")["status"].get("phase") == "Pending", fts.get("stored")["status"]
    events = k8s.kubectl("-n", namespace, "get", "events", "--field-selector", "reason=ModelStoreMissing", "-o", "name").stdout
    assert events.strip(), "a Warning event names the missing store"
    assert fts.jobs() == []  # several resyncs later (resync 1 s), still no Job
    create_store_claim(k8s, namespace)
    wait_for(lambda: fts.jobs(), 60, "the Job once the claim exists", on_timeout=op.log)
    (job,) = fts.jobs()
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "models"}} in volumes
