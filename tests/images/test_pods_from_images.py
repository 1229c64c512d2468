"""The operator image's pods on the real node (kubelet, containerd, runc): the image's root
filesystem, entrypoint and env, the pod's user, a read-only root where the pod says so, volumes
at their paths, and the pod network (DNS, Services, the host reaching a ClusterIP). What would
break in a cluster breaks here: a missing executable, a write to the read-only root, a module
the image lacks."""

from __future__ import annotations

import json
import os

import pytest
from kubernetes import client

from deltafleet.operator.images import IMAGES, OPERATOR_IMAGE

pytestmark = pytest.mark.cluster

# The chart's pod and container security contexts (values.yaml).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def pod(name: str, container: dict, *, security: dict | None = None, volumes: list | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "securityContext": POD_SECURITY if security is None else security,
                 "containers": [{"name": "main", "image": OPERATOR_IMAGE, "securityContext": CONTAINER_SECURITY,
                                 **container}],
                 "volumes": volumes or []},
    }


def run_pod(k8s, namespace: str, manifest: dict) -> client.V1Pod:
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(manifest))
    name = manifest["metadata"]["name"]
    with k8s.api() as api:
        core = client.CoreV1Api(api)
        return k8s.wait_for(lambda: (p := core.read_namespaced_pod(name, namespace)).status.phase in ("Succeeded", "Failed") and p,
                            f"pod {name} to finish")


def terminated(p: client.V1Pod):
    return p.status.container_statuses[0].state.terminated


SCRIPT = """
id -u; id -g; id -G
deltafleet operator --help >/dev/null && echo operator-cli-ok
python3 -c 'import torch' 2>/dev/null || echo no-torch
touch /opt/deltafleet/x 2>/dev/null || echo root-read-only
touch /etc/x 2>/dev/null || echo etc-read-only
echo scratch > /tmp/file && cat /tmp/file
cat /config/greeting; echo
test -e {host_path} || echo host-invisible
echo done > /dev/termination-log
"""


def test_pod_runs_from_its_image_as_its_user_with_a_read_only_root(k8s, namespace, operator_image):
    k8s.node.import_images()  # the images this session built, if the node started before them
    k8s.kubectl("-n", namespace, "create", "configmap", "greeting", "--from-literal=greeting=hello")
    script = SCRIPT.format(host_path=os.getcwd())
    p = run_pod(k8s, namespace, pod("inside", {
        "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "config", "mountPath": "/config"}],
    }, volumes=[{"name": "tmp", "emptyDir": {}}, {"name": "config", "configMap": {"name": "greeting"}}]))
    log = k8s.pod_log(namespace, "inside").splitlines()
    assert p.status.phase == "Succeeded", log
    assert log == ["65532", "65532", "65532", "operator-cli-ok", "no-torch", "root-read-only", "etc-read-only",
                   "scratch", "hello", "host-invisible"]
    assert terminated(p).message == "done\n"
    assert p.status.container_statuses[0].image_id == f"{IMAGES['operator'].repository}@{operator_image['digest']}"


def test_the_images_entrypoint_and_cmd_run_when_the_pod_names_no_command(k8s, namespace, operator_image):
    # args replace the image's CMD (`operator`) and keep its ENTRYPOINT (`deltafleet`).
    p = run_pod(k8s, namespace, pod("entrypoint", {"args": ["crds"]}))
    assert p.status.phase == "Succeeded"
    assert "kind: CustomResourceDefinition" in k8s.pod_log(namespace, "entrypoint")


def test_a_write_to_the_read_only_root_fails_the_pod(k8s, namespace, operator_image):
    p = run_pod(k8s, namespace, pod("writer", {"command": ["python3", "-c", "open('/opt/deltafleet/state', 'w')"]}))
    assert p.status.phase == "Failed" and terminated(p).exit_code == 1
    assert "Read-only file system" in k8s.pod_log(namespace, "writer")


def test_a_writable_root_is_private_to_the_container_and_still_not_the_users(k8s, namespace, operator_image):
    writable = {**CONTAINER_SECURITY, "readOnlyRootFilesystem": False}
    p = run_pod(k8s, namespace, pod("rw", {
        "command": ["sh", "-c", "touch /opt/deltafleet/x 2>/dev/null || echo not-owner; mkdir /scratch && echo made-scratch"],
        "securityContext": writable,
    }, security={**POD_SECURITY, "runAsUser": 0, "runAsNonRoot": False}))
    # root may write its root filesystem; the write lands in the container's own layer
    assert p.status.phase == "Succeeded" and k8s.pod_log(namespace, "rw").splitlines() == ["made-scratch"]
    assert not (operator_image["rootfs"] / "scratch").exists() and not (operator_image["rootfs"] / "opt/deltafleet/x").exists()
    p = run_pod(k8s, namespace, pod("rw-user", {
        "command": ["sh", "-c", "touch /opt/deltafleet/x 2>/dev/null || echo not-owner"], "securityContext": writable}))
    assert k8s.pod_log(namespace, "rw-user").splitlines() == ["not-owner"]  # uid 65532 owns nothing there


def test_a_missing_executable_is_a_start_error(k8s, namespace, operator_image):
    p = run_pod(k8s, namespace, pod("typo", {"command": ["deltafleet-operator"]}))
    t = terminated(p)
    assert p.status.phase == "Failed" and (t.exit_code, t.reason) == (128, "StartError")
    assert 'exec: "deltafleet-operator": executable file not found in $PATH' in t.message


def test_run_as_non_root_refuses_a_root_user(k8s, namespace, operator_image):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(
        pod("rooted", {"command": ["true"]}, security={**POD_SECURITY, "runAsUser": 0})))

    def waiting():
        with k8s.api() as api:
            p = client.CoreV1Api(api).read_namespaced_pod("rooted", namespace)
        s = p.status.container_statuses  # ContainerCreating first, then the config error
        w = s and s[0].state.waiting
        return w if w and w.reason != "ContainerCreating" else None

    w = k8s.wait_for(waiting, "the pod to wait with a config error")
    assert w.reason == "CreateContainerConfigError" and "breaks non-root policy" in w.message


CLIENT = """
import socket, time, urllib.request
print(socket.gethostbyname("web"))  # the search path: web.<namespace>.svc.cluster.local
for attempt in range(40):  # kube-proxy programs a new Service within a second or two
    try:
        print(urllib.request.urlopen("http://web/greeting", timeout=5).read().decode())
        break
    except OSError:
        time.sleep(0.5)
"""


def test_pods_reach_a_service_by_name_and_the_host_reaches_its_cluster_ip(k8s, namespace, operator_image):
    k8s.kubectl("-n", namespace, "create", "configmap", "site", "--from-literal=greeting=hello-from-web")
    web = pod("web", {"command": ["python3", "-m", "http.server", "8080", "--directory", "/site"],
                      "volumeMounts": [{"name": "site", "mountPath": "/site"}]},
              volumes=[{"name": "site", "configMap": {"name": "site"}}])
    web["metadata"]["labels"] = {"app": "web"}
    web["spec"]["restartPolicy"] = "Always"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                               "items": [web, service]}))
    k8s.kubectl("-n", namespace, "wait", "--for=condition=Ready", "pod/web", "--timeout=120s")
    p = run_pod(k8s, namespace, pod("client", {"command": ["python3", "-c", CLIENT]}))
    cluster_ip = k8s.kubectl("-n", namespace, "get", "service", "web", "-o", "jsonpath={.spec.clusterIP}").stdout
    assert p.status.phase == "Succeeded"
    assert k8s.pod_log(namespace, "client").splitlines() == [cluster_ip, "hello-from-web"]
    # The host (where the tests and a user's kubectl run) reaches the ClusterIP through kube-proxy.
    import urllib.request

    assert urllib.request.urlopen(f"http://{cluster_ip}/greeting", timeout=10).read() == b"hello-from-web"
