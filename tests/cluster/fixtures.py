"""pytest fixtures for the real test control plane (registered in tests/conftest.py).

    def test_x(k8s, namespace):
        k8s.kubectl("-n", namespace, "apply", "-f", "job.yaml")

`k8s` starts etcd, kube-apiserver, kube-controller-manager and the pod runner once per
session; `namespace` is a fresh namespace per test, deleted afterwards. `k8s_node` is a
cluster with kube-scheduler and one real node (kubelet, containerd, kube-proxy, CoreDNS;
node.py); `k8s_skew` is the control plane at the oldest supported Kubernetes minor
(tools/k8s-skew), for the chart/CRD skew check."""

from __future__ import annotations

import os
import uuid

import pytest

from .binaries import ToolsMissing
from .controlplane import Cluster


def _session_cluster(skew: bool, node: bool = False):
    try:
        cluster = Cluster(keep_workdir=bool(os.environ.get("DELTAFLEET_KEEP_CLUSTER")), skew=skew, node=node).start()
    except ToolsMissing as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def k8s():
    yield from _session_cluster(skew=False)


@pytest.fixture(scope="session")
def k8s_node():
    yield from _session_cluster(skew=False, node=True)


@pytest.fixture(scope="session")
def k8s_skew():
    yield from _session_cluster(skew=True)


def _namespace(cluster, request):
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(k8s, request):
    yield from _namespace(k8s, request)


@pytest.fixture
def node_namespace(k8s_node, request):
    yield from _namespace(k8s_node, request)
