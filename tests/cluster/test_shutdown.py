"""A control plane stops cleanly: no process, port or temp folder is left behind, including
the processes of pods still running."""

import os
import socket

import pytest

from .controlplane import Cluster
from .test_podrunner import _alive, job_yaml

pytestmark = pytest.mark.cluster


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stop_leaves_nothing_running():
    # A control plane of its own: the session one keeps serving the other tests.
    cluster = Cluster().start()
    try:
        cluster.kubectl("apply", "-f", "-", input=job_yaml("sleeper", ["sleep", "300"]))
        pod_pid = cluster.wait_for(lambda: _running_pid(cluster), "the sleeper pod to run")
        pids = cluster.pids() + [pod_pid]
        ports = [cluster.port, int(cluster.etcd_url.rsplit(":", 1)[1])]
        workdir = cluster.workdir
        assert all(_alive(p) for p in pids) and all(_listening(p) for p in ports)
    finally:
        cluster.stop()
    assert [p for p in pids if _alive(p)] == []
    assert [p for p in ports if _listening(p)] == []
    assert not workdir.exists()


def _running_pid(cluster):
    out = cluster.kubectl("get", "pods", "-l", "job-name=sleeper", "-o",
                          "jsonpath={.items[0].status.containerStatuses[0].containerID}", check=False).stdout
    return int(out.removeprefix("local://")) if out.startswith("local://") and os.path.exists(f"/proc/{out[8:]}") else None
