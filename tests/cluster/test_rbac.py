"""The API server runs with RBAC and service-account tokens: a ServiceAccount acts with
exactly the rights bound to it."""

import pytest

from .controlplane import CommandError

pytestmark = pytest.mark.cluster


def test_serviceaccount_without_roles_is_forbidden_until_bound(k8s, namespace):
    k8s.kubectl("-n", namespace, "create", "serviceaccount", "nobody")
    sa = k8s.sa_kubeconfig(namespace, "nobody")

    whoami = k8s.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=sa)
    assert whoami.stdout == f"system:serviceaccount:{namespace}:nobody"

    can = k8s.kubectl("-n", namespace, "auth", "can-i", "list", "pods", kubeconfig=sa, check=False)
    assert (can.returncode, can.stdout.strip()) == (1, "no")
    with pytest.raises(CommandError, match="Forbidden|forbidden"):
        k8s.kubectl("-n", namespace, "get", "pods", kubeconfig=sa)

    # The admin (system:masters) may; the account may once a Role grants it, and only there.
    assert k8s.kubectl("-n", namespace, "auth", "can-i", "list", "pods").stdout.strip() == "yes"
    k8s.kubectl("-n", namespace, "create", "role", "pod-reader", "--verb=list", "--resource=pods")
    k8s.kubectl("-n", namespace, "create", "rolebinding", "nobody-reads", "--role=pod-reader",
                f"--serviceaccount={namespace}:nobody")
    k8s.wait_for(lambda: k8s.kubectl("-n", namespace, "auth", "can-i", "list", "pods",
                                     kubeconfig=sa, check=False).returncode == 0, "the RoleBinding to apply")
    k8s.kubectl("-n", namespace, "get", "pods", kubeconfig=sa)
    assert k8s.kubectl("-n", "default", "auth", "can-i", "list", "pods", kubeconfig=sa, check=False).stdout.strip() == "no"
    assert k8s.kubectl("-n", namespace, "auth", "can-i", "delete", "pods", kubeconfig=sa, check=False).stdout.strip() == "no"


def test_garbage_collector_and_serviceaccount_controller_run(k8s, namespace):
    # Every namespace gets its `default` ServiceAccount and kube-root-ca.crt from the controllers.
    k8s.wait_for(lambda: k8s.kubectl("-n", namespace, "get", "sa", "default", check=False).returncode == 0,
                 "the default ServiceAccount")
    k8s.wait_for(lambda: k8s.kubectl("-n", namespace, "get", "configmap", "kube-root-ca.crt",
                                     check=False).returncode == 0, "kube-root-ca.crt")
    # An owned object disappears with its owner (the garbage collector is running).
    uid = k8s.kubectl("-n", namespace, "create", "configmap", "owner", "-o", "jsonpath={.metadata.uid}").stdout
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=f"""
apiVersion: v1
kind: ConfigMap
metadata:
  name: owned
  ownerReferences: [{{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}]
""")
    k8s.kubectl("-n", namespace, "delete", "configmap", "owner")
    k8s.wait_for(lambda: k8s.kubectl("-n", namespace, "get", "configmap", "owned", check=False).returncode != 0,
                 "the garbage collector to delete the owned ConfigMap")
