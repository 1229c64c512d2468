"""A compression Job, built by the operator's own Job builder, runs `deltafleet compress` from the
ML image built from images/ml/Dockerfile: torch, transformers and the deltafleet wheel are the
image's, the user is the Job's (uid 1000), the root is read-only, the model store is a
hostPath, and the result comes back in the termination message: on the real node (kubelet,
containerd, runc)."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from kubernetes import client

from deltafleet.compress.result import CompressResult
from deltafleet.operator import compression as comp
from deltafleet.operator import jobs
from deltafleet.operator.api import FineTune
from deltafleet.operator.images import IMAGES, ML_IMAGE, OPERATOR_IMAGE
from deltafleet.operator.settings import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STORE_GROUP = Settings().store_group  # 1000: the ML image's group


def imaged(namespace: str, steps: int) -> FineTune:
    """The FineTune both tests compress: the store's toy pair, on CPU."""
    return FineTune.model_validate({
        "apiVersion": "deltafleet.dev/v1alpha1", "kind": "FineTune",
        "metadata": {"name": "imaged", "namespace": namespace, "generation": 1},
        "spec": {"baseModel": {"path": "bases/tiny"}, "fineTunedModel": {"path": "finetunes/tiny-code"},
                 "compression": {"steps": steps, "batchSize": 2, "gpus": 0,
                                 "calibration": {"path": "data/cal.txt", "samples": 4, "seqLen": 32}}},
    })


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
    # As docs/deploy.md sets a store up: deltas/ belongs to the store's group, setgid, group-writable.
    (root / "deltas").mkdir()
    os.chown(root / "deltas", 0, STORE_GROUP)
    (root / "deltas").chmod(0o2775)
    return root


def test_compression_job_runs_from_the_ml_image(k8s, namespace, ml_image, store):
    k8s.node.import_images()  # the images this session built, if the node started before them
    ft = imaged(namespace, steps=2)
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


def deleter_pod(name: str, namespace: str, store, groups: list[int]) -> dict:
    """The operator's image and user (the chart's pod security), deleting a FineTune's deltas
    with the operator's own code, in the given supplementary groups."""
    script = (f"from deltafleet.operator.compression import delete_deltas; "
              f"print(delete_deltas({namespace!r}, 'imaged', '/models'))")
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                                     "supplementalGroups": groups, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "main", "image": OPERATOR_IMAGE, "command": ["python3", "-c", script],
                                 "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                     "capabilities": {"drop": ["ALL"]}},
                                 "volumeMounts": [{"name": "store", "mountPath": "/models"}]}],
                 "volumes": [{"name": "store", "hostPath": {"path": str(store)}}]},
    }


def run_to_end(k8s, namespace: str, manifest: dict) -> str:
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(manifest))
    name = manifest["metadata"]["name"]
    with k8s.api() as api:
        core = client.CoreV1Api(api)
        k8s.wait_for(lambda: core.read_namespaced_pod(name, namespace).status.phase in ("Succeeded", "Failed"), f"pod {name} to finish")
        return core.read_namespaced_pod(name, namespace).status.phase


def test_the_operator_deletes_what_a_job_wrote_through_the_stores_group(k8s, namespace, ml_image, operator_image, store):
    """deletionPolicy Delete across users: a Job (uid 1000) writes the delta, the operator
    (uid 65532, in the store's group) removes it and nothing is left; outside the group it cannot."""
    k8s.node.import_images()
    ft = imaged(namespace, steps=0)
    job = jobs.build_job(ft, comp.compression_hash(ft.spec), 1, 0, Settings(store_host_path=str(store)))
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    assert k8s.wait_job(namespace, job["metadata"]["name"], timeout_s=600) == "Complete"
    folder = store / "deltas" / namespace / "imaged"
    written = [folder, *folder.rglob("*")]
    assert {p.stat().st_uid for p in written} == {1000} and {p.stat().st_gid for p in written} == {STORE_GROUP}
    assert all(p.stat().st_mode & stat.S_IWGRP for p in written if p.is_dir())

    # Without the group the operator's user cannot remove the Job's files.
    assert run_to_end(k8s, namespace, deleter_pod("outsider", namespace, store, [])) == "Failed"
    assert (folder / "g1" / "delta.safetensors").is_file()
    # In the store's group (the chart's operator pod) it can, and nothing is left.
    assert run_to_end(k8s, namespace, deleter_pod("operator", namespace, store, [STORE_GROUP])) == "Succeeded"
    assert k8s.pod_log(namespace, "operator").strip() == "True"
    assert not folder.exists() and list((store / "deltas" / namespace).iterdir()) == []
