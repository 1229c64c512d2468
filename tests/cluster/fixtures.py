"""pytest fixtures for the real test control plane (registered in tests/conftest.py).

    def test_x(k8s, namespace):
        k8s.kubectl("-n", namespace, "apply", "-f", "job.yaml")

`k8s` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and one real
node (kubelet, containerd, kube-proxy, CoreDNS; node.py) once per session: every pod of
every test runs there. `namespace` is a fresh namespace per test, deleted afterwards.
`k8s_skew` is the control plane alone (no node: its pods never run) at the oldest supported
Kubernetes minor (tools/k8s-skew), for the chart/CRD skew check. `operator_image`,
`ml_image`: the images images/build.py built (a cache lookup after `make test-images`);
`ml_job_image`: the ML image by digest, on the node — what compression Jobs run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]

# helm flags for a release whose operator Deployment must not act: its pod stays Waiting
# (ErrImageNeverPull) under the kubelet, because the test runs `deltafleet operator` itself —
# as the release's ServiceAccount, to SIGKILL it, to run its peers or to read its exit.
NO_CHART_OPERATOR = ("--set", "image.repository=deltafleet.test/operator-run-by-the-test", "--set", "image.pullPolicy=Never")


def helm_test_phases(output: str) -> dict[str, str]:
    """{hook pod: phase} from `helm test`'s report. A hook that succeeded is deleted at once
    (its delete policy), log and all: its phase is what is left to read."""
    return dict(re.findall(r"TEST SUITE:\s+(\S+)\n(?:[^\n]*\n)*?Phase:\s+(\w+)", output))


def build_module():
    spec = importlib.util.spec_from_file_location("deltafleet_images_build", ROOT / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unpacked(kind: str) -> dict:
    build = build_module()
    try:
        folder = build.unpacked(kind)
    except build.BuildError as e:
        pytest.fail(f"the {kind} image: {e}", pytrace=False)
    meta = json.loads((folder / "image.json").read_text())
    return {"folder": folder, "rootfs": folder / "rootfs", **meta, **json.loads((folder / "build.json").read_text())}


@pytest.fixture(scope="session")
def operator_image() -> dict:
    return _unpacked("operator")


@pytest.fixture(scope="session")
def ml_image() -> dict:
    return _unpacked("ml")


@pytest.fixture(scope="session")
def ml_job_image(k8s, ml_image) -> str:
    """The ML image by digest, imported into the node (if the node started before it was built)."""
    from deltafleet.operator.images import IMAGES

    k8s.node.import_images()
    return f"{IMAGES['ml'].repository}@{ml_image['digest']}"
