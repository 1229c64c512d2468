"""The real node (node.py) comes up and leaves the host as it found it: no link, address,
route, firewall rule, mount, cgroup, sysctl, file under containerd's, CNI's or the kubelet's
fixed paths, or process of the node's binaries survives `Cluster.stop()` — nor a component's
process, port or the cluster's temp folder, with a pod still running when it stops."""

from __future__ import annotations

import json

import pytest

from .controlplane import Cluster
from .hoststate import differences, snapshot
from .node_images import PAUSE_REF

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
        sleeper = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": "default"},
                   "spec": {"containers": [{"name": "pause", "image": PAUSE_REF, "imagePullPolicy": "Never"}]}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(sleeper))
        cluster.wait_for(lambda: cluster.kubectl("get", "pod", "sleeper", "-o", "jsonpath={.status.phase}").stdout
                         == "Running", "a long-running pod", 60)
        during = snapshot()
        assert differences(before, during), "the node changed nothing the snapshot sees: the check is blind"
        pids, workdir = cluster.pids(), cluster.workdir
        ports = [cluster.port, int(cluster.etcd_url.rsplit(":", 1)[1])]  # the API server's, etcd's
        assert all(_alive(p) for p in pids) and set(ports) <= _listening()
    finally:
        cluster.stop()
    assert differences(before, snapshot()) == {}
    assert [p for p in pids if _alive(p)] == []
    assert set(ports) & _listening() == set()
    assert not workdir.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


def _listening() -> set[int]:
    """Ports with a listening TCP socket in this network namespace (a connect would not do: the
    API server's address goes with the node's link, and another test node may route to it)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # TCP_LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports
