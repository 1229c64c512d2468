"""The real node (node.py) comes up and leaves the host as it found it: no link, address,
route, firewall rule, mount, cgroup, sysctl, file under containerd's, CNI's or the kubelet's
fixed paths, or process of the node's binaries survives `Cluster.stop()`."""

from __future__ import annotations

import json

import pytest

from .controlplane import Cluster
from .hoststate import differences, snapshot

pytestmark = pytest.mark.cluster


def test_a_node_runs_a_pod_and_leaves_the_host_as_it_found_it():
    before = snapshot()
    cluster = Cluster(node=True, project_images=False).start()
    try:
        assert cluster.node.ready()
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "version", "namespace": "default"},
               "spec": {"restartPolicy": "Never", "containers": [
                   {"name": "coredns", "image": "deltafleet.test/coredns:node", "imagePullPolicy": "Never",
                    "command": ["/coredns", "-version"]}]}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        cluster.wait_for(lambda: cluster.kubectl("get", "pod", "version", "-o", "jsonpath={.status.phase}").stdout
                         == "Succeeded", "the pod to succeed", 60)
        assert "CoreDNS-1.15.0" in cluster.pod_log("default", "version")
        during = snapshot()
        assert differences(before, during), "the node changed nothing the snapshot sees: the check is blind"
    finally:
        cluster.stop()
    assert differences(before, snapshot()) == {}
