"""A compression Job, built by the operator's own Job builder, runs `deltafleet compress` from the
ML image built from images/ml/Dockerfile: torch, transformers and the deltafleet wheel are the
image's, the user is the Job's (uid 1000), the root is read-only, the model store is a
bind-mounted hostPath, and the result comes back in the termination message."""

from __future__ import annotations

import json
import shutil

import pytest
from kubernetes import client

from deltafleet.compress.result import CompressResult
from deltafleet.operator import compression as comp
from deltafleet.operator import jobs
from deltafleet.operator.api import FineTune
from deltafleet.operator.images import IMAGES, ML_IMAGE
from deltafleet.operator.settings import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def store(tmp_path):
    """A model store the Job's user can read, with a folder it can write deltas to."""
    from deltafleet.toymodels import toy_eval_text, toy_pair

    base, ft = toy_pair("llama")
    root = tmp_path / "store"
    shutil.copytree(base, root / "bases" / "tiny")
    shutil.copytree(ft, root / "finetunes" / "tiny-code")
    (root / "data").mkdir()
    text = toy_eval_text("llama").read_text()
    (root / "data" / "cal.txt").write_text(text[:text.index("\n", 6000) + 1])
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (root / "deltas").mkdir(mode=0o777)
    (root / "deltas").chmod(0o777)
    return root


def test_compression_job_runs_from_the_ml_image(k8s, namespace, ml_image, store):
    ft = FineTune.model_validate({
        "apiVersion": "deltafleet.dev/v1alpha1", "kind": "FineTune",
        "metadata": {"name": "imaged", "namespace": namespace, "generation": 1},
        "spec": {"baseModel": {"path": "bases/tiny"}, "fineTunedModel": {"path": "finetunes/tiny-code"},
                 "compression": {"steps": 2, "batchSize": 2, "gpus": 0,
                                 "calibration": {"path": "data/cal.txt", "samples": 4, "seqLen": 32}}},
    })
    settings = Settings(store_host_path=str(store))  # the defaults: the ML image, uid 1000
    job = jobs.build_job(ft, comp.compression_hash(ft.spec), 1, 0, settings)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == ML_IMAGE
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    name = job["metadata"]["name"]
    outcome = k8s.wait_job(namespace, name, timeout_s=600)
    with k8s.api() as api:
        [pod] = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    log = k8s.pod_log(namespace, pod.metadata.name)
    assert outcome == "Complete", log[-3000:]
    status = pod.status.container_statuses[0]
    assert status.image_id == f"{IMAGES['ml'].repository}@{ml_image['digest']}"
    result = CompressResult.model_validate_json(status.state.terminated.message)
    out = store / comp.output_dir(namespace, "imaged", 1).removeprefix("/models/")
    delta = out / "delta.safetensors"
    assert delta.is_file() and delta.stat().st_uid == 1000  # written by the Job's user, not root
    assert result.delta_uri.endswith(f"g1/{delta.name}"), result
