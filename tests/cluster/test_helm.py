"""helm installs into the test cluster, and `helm test` hook pods run on the real node with
their own ServiceAccount's identity (not the admin's): the in-cluster config, its token and
the `kubernetes` Service, from the operator image's Python and client."""

import json
import re
import textwrap

import pytest

pytestmark = pytest.mark.cluster

CHECK = textwrap.dedent("""
    import sys
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    config.load_incluster_config()
    core = client.CoreV1Api()
    print("configmaps:", len(core.list_namespaced_config_map(sys.argv[1]).items))
    try:
        core.list_namespaced_secret(sys.argv[1])
    except ApiException as e:
        print("secrets:", e.status)
        sys.exit(0 if e.status == 403 else 1)
    sys.exit("listing secrets was allowed")
""")


def write_chart(root, image: str):
    (root / "templates" / "tests").mkdir(parents=True)
    (root / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (root / "templates" / "rbac.yaml").write_text(textwrap.dedent("""
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: probe}
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: Role
        metadata: {name: probe}
        rules: [{apiGroups: [""], resources: [configmaps], verbs: [list]}]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: RoleBinding
        metadata: {name: probe}
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: probe}
        subjects: [{kind: ServiceAccount, name: probe}]
    """))
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        # No hook-delete-policy: the pod (and its log) stays after it succeeds.
        "metadata": {"name": "probe-test", "annotations": {"helm.sh/hook": "test"}},
        "spec": {"restartPolicy": "Never", "serviceAccountName": "probe", "containers": [{
            "name": "check", "image": image, "imagePullPolicy": "Never",
            "command": ["python3", "-c", CHECK, "{{ .Release.Namespace }}"]}]},
    }
    (root / "templates" / "tests" / "probe.yaml").write_text(json.dumps(pod))


def test_helm_install_and_test_hook_acts_as_its_serviceaccount(k8s, namespace, operator_image, tmp_path):
    from deltafleet.operator.images import IMAGES

    k8s.node.import_images()
    write_chart(tmp_path / "probe", f"{IMAGES['operator'].repository}@{operator_image['digest']}")
    k8s.helm("install", "probe", tmp_path / "probe", "-n", namespace, "--wait")
    out = k8s.helm("test", "probe", "-n", namespace, "--timeout", "120s", check=False)
    log = k8s.pod_log(namespace, "probe-test")
    assert out.returncode == 0, out.stdout + out.stderr + log
    assert re.search(r"Phase:\s+Succeeded", out.stdout), out.stdout
    assert log.splitlines() == ["configmaps: 1", "secrets: 403"]  # kube-root-ca.crt; no secrets
