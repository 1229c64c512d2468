"""The chart installed on the test cluster's real node runs its operator from the operator image
built from images/operator/Dockerfile (pinned by image.digest): as uid 65532, with a read-only
root, with its ServiceAccount's in-cluster identity; and `helm test` runs its pod from the same
image."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from deltafleet.operator.images import IMAGES

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "deltafleet"


@pytest.fixture
def release(k8s, operator_image, tmp_path):
    k8s.node.import_images()  # the images this session built, if the node started before them
    suffix = uuid.uuid4().hex[:5]
    system, watched = k8s.create_namespace(f"images-system-{suffix}"), k8s.create_namespace(f"images-team-{suffix}")
    own_crd = k8s.kubectl("get", "crd", "finetunes.deltafleet.dev", check=False).returncode != 0
    k8s.helm("install", "img", CHART, "-n", system, "--set", "watch.allNamespaces=false",
             "--set", f"watch.namespaces={{{watched}}}", "--set", f"image.digest={operator_image['digest']}",
             "--set", f"modelStore.hostPath={tmp_path}", "--set", f"crds.enabled={str(own_crd).lower()}")
    yield {"system": system, "watched": watched}
    # The operator first (a running operator puts back a finalizer taken away), then the
    # finalizers it left, then the CRD: one FineTune left with a finalizer would keep the CRD
    # terminating for every later test on this cluster.
    k8s.helm("uninstall", "img", "-n", system, "--wait", check=False)
    for line in k8s.kubectl("get", "ft", "-A", "-o", "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
                            check=False).stdout.split():
        ns, name = line.split("/", 1)
        k8s.kubectl("patch", "ft", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
    if own_crd:
        k8s.kubectl("delete", "crd", "finetunes.deltafleet.dev", "--wait=true", "--timeout=60s", check=False)
    for ns in (system, watched):
        k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def operator_pod(k8s, namespace: str):
    with k8s.api() as api:
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=operator").items
    return pods[0] if pods and pods[0].status.phase == "Running" else None


def test_the_charts_operator_runs_from_its_image(k8s, release, operator_image):
    ref = f"{IMAGES['operator'].repository}@{operator_image['digest']}"
    pod = k8s.wait_for(lambda: operator_pod(k8s, release["system"]), "the operator's Deployment pod to run", 120)
    status = pod.status.container_statuses[0]
    assert pod.spec.containers[0].image == ref and status.image_id == ref

    port = next(p.container_port for p in pod.spec.containers[0].ports if p.name == "health")

    def healthy():  # from the host, through the node's pod network
        try:
            return urllib.request.urlopen(f"http://{pod.status.pod_ip}:{port}/healthz", timeout=2).status == 200
        except OSError:
            return False

    try:
        k8s.wait_for(healthy, "kopf's /healthz from the operator pod", 120)
    except TimeoutError as e:
        raise AssertionError(f"{e}; its log:\n{k8s.pod_log(release['system'], pod.metadata.name)[-3000:]}") from None
    # The container's pid 1 is the operator (the image's entrypoint), as seen from inside it.
    inside = k8s.kubectl("-n", release["system"], "exec", pod.metadata.name, "--", "python3", "-c",
                         "print(open('/proc/1/cmdline').read().replace(chr(0), ' ')); print(open('/proc/1/status').read());"
                         "print(open('/proc/1/mountinfo').read())").stdout
    assert "deltafleet operator" in inside.splitlines()[0]
    uids = next(line for line in inside.splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == ["65532"] * 4
    root = next(line.split() for line in inside.splitlines() if len(line.split()) > 5 and line.split()[4] == "/")
    assert "ro" in root[5].split(","), root

    # It acts through the API server with its in-cluster ServiceAccount identity: a FineTune in
    # the watched namespace gets a compression Job and a status.
    ft = {"apiVersion": "deltafleet.dev/v1alpha1", "kind": "FineTune",
          "metadata": {"name": "from-image", "namespace": release["watched"]},
          "spec": {"baseModel": {"path": "bases/none"}, "fineTunedModel": {"path": "finetunes/none"},
                   "compression": {"gpus": 0}}}
    k8s.kubectl("apply", "-f", "-", input=json.dumps(ft))

    def job_and_status():
        jobs = json.loads(k8s.kubectl("get", "jobs", "-n", release["watched"], "-o", "json").stdout)["items"]
        got = json.loads(k8s.kubectl("get", "ft", "from-image", "-n", release["watched"], "-o", "json").stdout)
        return jobs and got.get("status", {}).get("phase") and jobs[0]

    job = k8s.wait_for(job_and_status, "the operator to create a Job and write status", 120)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGES["ml"].ref()


def test_helm_test_runs_from_the_operator_image(k8s, release, operator_image):
    seen: dict = {}
    stop = threading.Event()

    def watch():  # the hook pod is deleted once it succeeds: record what it ran from meanwhile
        with k8s.api() as api:
            core = client.CoreV1Api(api)
            while not stop.is_set():
                for p in core.list_namespaced_pod(release["system"], label_selector="app.kubernetes.io/component=test").items:
                    for s in p.status.container_statuses or []:
                        if s.image_id:
                            seen[p.metadata.name] = s.image_id
                time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = k8s.helm("test", "img", "-n", release["system"], "--logs", "--timeout", "120s", check=False)
    finally:
        stop.set()
        t.join()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: FineTunes readable, Secrets not" in out.stdout
    assert f"ok: the operator Deployment {release['system']}/img-deltafleet is available" in out.stdout
    ref = f"{IMAGES['operator'].repository}@{operator_image['digest']}"
    assert seen == {"img-deltafleet-test-access": ref, "img-deltafleet-test-operator-ready": ref}
