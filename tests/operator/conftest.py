"""Fixtures of the operator's integration tests: the model store with the toy models, the
chart's RBAC (the operator always runs as the chart's ServiceAccount, never as admin), a
local Ray, a RayService CRD, and operator subprocesses that are stopped after each test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from op_harness import CHART, RAY_NS, RAYSERVICE, SYSTEM_NS, LocalRay, OperatorProcess, kuberay_crd, wait_established, wait_for

from cluster.fixtures import NO_CHART_OPERATOR
from deltafleet.operator.settings import Settings

STORE_GROUP = Settings().store_group  # 1000: the ML image's group, the Jobs' supplemental group



@pytest.fixture(scope="session")
def store():
    """The model store (a hostPath): two base folders (same weights, two pools), a fine-tune, calibration text."""
    from deltafleet.toymodels import toy_eval_text, toy_pair

    base, ft = toy_pair("llama")
    root = Path(tempfile.mkdtemp(prefix="deltafleet-store-"))
    shutil.copytree(base, root / "bases" / "tiny")
    shutil.copytree(base, root / "bases" / "tiny-b")
    shutil.copytree(ft, root / "finetunes" / "tiny-code")
    (root / "deltas").mkdir()
    # Calibration from a short file: sampling it from the fine-tune would dominate the test's
    # time, and compress holds out a fifth of the file's windows (up to 64) for the fidelity
    # eval, so ~6,000 characters (~100 windows of 32 tokens) keep the eval to ~20 samples.
    (root / "data").mkdir()
    text = toy_eval_text("llama").read_text()
    (root / "data" / "cal.txt").write_text(text[:text.index("\n", 6000) + 1])
    # The Jobs' user (uid 1000) reads it; deltas/ is the store group's, setgid, group-writable,
    # as docs/deploy.md sets a store up (a hostPath ignores fsGroup).
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    os.chown(root / "deltas", 0, STORE_GROUP)
    (root / "deltas").chmod(0o2775)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def chart(k8s):
    """Two releases of the chart: `deltafleet` (CRD, ray-api backend) and `deltafleet-rs`
    (rayservice backend, RBAC for one RayService). Returns {backend: SA kubeconfig}.
    The session's cluster is shared: a CRD another release installed is left to its owner."""
    for ns in (SYSTEM_NS, RAY_NS):
        k8s.kubectl("create", "namespace", ns, check=False)
    own_crd = k8s.kubectl("get", "crd", "finetunes.deltafleet.dev", check=False).returncode != 0
    k8s.helm("install", "deltafleet", CHART, "-n", SYSTEM_NS, *NO_CHART_OPERATOR, "--set", "serve.backend=ray-api",
             "--set", "watch.allNamespaces=true", "--set", "tests.enabled=false",
             "--set", f"crds.enabled={str(own_crd).lower()}")
    k8s.helm("install", "deltafleet-rs", CHART, "-n", SYSTEM_NS, *NO_CHART_OPERATOR, "--set", "serve.backend=rayservice",
             "--set", "crds.enabled=false", "--set", f"serve.rayService.name={RAYSERVICE}",
             "--set", f"serve.rayService.namespace={RAY_NS}", "--set", "watch.allNamespaces=true", "--set", "tests.enabled=false")
    wait_established(k8s, "finetunes.deltafleet.dev")
    yield {
        "ray-api": k8s.sa_kubeconfig(SYSTEM_NS, "deltafleet"),
        "rayservice": k8s.sa_kubeconfig(SYSTEM_NS, "deltafleet-rs"),
    }
    # The operators are gone: FineTunes the tests left would hold their finalizer (and the
    # CRD's deletion) forever, so release them first.
    for ref in k8s.kubectl("get", "finetunes.deltafleet.dev", "-A", "-o",
                           "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}", check=False).stdout.split():
        ns, name = ref.split("/")
        k8s.kubectl("-n", ns, "patch", "finetunes.deltafleet.dev", name, "--type=merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False)
    k8s.helm("uninstall", "deltafleet-rs", "-n", SYSTEM_NS, check=False)
    k8s.helm("uninstall", "deltafleet", "-n", SYSTEM_NS, check=False)
    if own_crd:  # helm.sh/resource-policy: keep leaves it behind, owned by a release that is gone
        k8s.kubectl("delete", "crd", "finetunes.deltafleet.dev", "--wait=true", "--timeout=60s", check=False)


@pytest.fixture(scope="session")
def rayservice_crd(k8s):
    crd = kuberay_crd()
    # Too big for client-side apply's last-applied annotation: create (or replace) it.
    if k8s.kubectl("get", "crd", "rayservices.ray.io", check=False).returncode != 0:
        k8s.kubectl("create", "-f", crd)
    wait_established(k8s, "rayservices.ray.io")
    return crd


def render_pool(k8s, name: str, namespace: str, *sets: str) -> str:
    """The chart's own RayService (templates/pool.yaml), as `helm install` with pool.create renders it."""
    args = ["template", "pool", str(CHART), "--show-only", "templates/pool.yaml", "--set", "pool.create=true",
            "--set", f"serve.rayService.name={name}", "--set", f"serve.rayService.namespace={namespace}",
            "--set", "modelStore.hostPath=/srv/models"]
    for s in sets:
        args += ["--set", s]
    return k8s.helm(*args).stdout


@pytest.fixture
def rayservice(k8s, chart, rayservice_crd):
    """The chart's RayService (no KubeRay runs: tests write its status as KubeRay would),
    created with strict server-side validation against KubeRay's CRD."""
    k8s.kubectl("delete", "rayservice", RAYSERVICE, "-n", RAY_NS, "--ignore-not-found", check=False)
    k8s.kubectl("create", "--validate=strict", "-f", "-", input=render_pool(k8s, RAYSERVICE, RAY_NS))
    yield RAYSERVICE
    k8s.kubectl("delete", "rayservice", RAYSERVICE, "-n", RAY_NS, "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def local_ray():
    ray = LocalRay().start()
    yield ray
    ray.stop()


@pytest.fixture
def run_operator(chart, store, ml_job_image, tmp_path):
    """Start `deltafleet operator` as the chart's ServiceAccount, watching the test's namespace;
    its compression Jobs run from the ML image on the node."""
    started: list[OperatorProcess] = []

    def start(namespace: str, backend: str, *extra: str, env: dict | None = None, ray: LocalRay | None = None,
              auth: str = "none", metrics_port: int = 0) -> OperatorProcess:
        args = [
            "--serve-backend", backend, "-n", namespace, "--serve-auth", auth, "--metrics-port", str(metrics_port),
            "--store-host-path", str(store), "--operator-store-path", str(store), "--replica-store-path", str(store),
            "--job-image", ml_job_image, "--resync-seconds", "1", "--retry-base-seconds", "1",
            "--delete-attempts", "3", "--replica-cpus", "1",
            "--rayservice-name", RAYSERVICE, "--rayservice-namespace", RAY_NS,
        ]
        if ray is not None:
            args += ["--ray-dashboard-url", ray.dashboard_url, "--serve-url", ray.serve_url,
                     "--ray-auth-token-file", str(ray.token_file)]
        proc = OperatorProcess(chart[backend], args + list(extra), tmp_path, env).start()
        started.append(proc)
        wait_for(lambda: proc.healthy() or proc.proc.poll() is not None, 60, "the operator's /healthz", on_timeout=proc.log)
        return proc

    yield start
    for proc in started:
        proc.stop()
