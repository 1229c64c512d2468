"""`helm test` against the real test cluster fails while the operator's Deployment is not
available and passes once it is: the chart's operator pod and its test hooks run from the
operator image under the real node's kubelet (probes included); the Deployment controller
decides availability."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cluster.fixtures import helm_test_phases

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "deltafleet"
READY_TIMEOUT_S = 30


@pytest.fixture
def release(k8s, operator_image):
    k8s.node.import_images()  # the operator image under the chart's default tag
    suffix = uuid.uuid4().hex[:5]
    system, watched = k8s.create_namespace(f"ready-system-{suffix}"), k8s.create_namespace(f"ready-team-{suffix}")
    own_crd = k8s.kubectl("get", "crd", "finetunes.deltafleet.dev", check=False).returncode != 0
    # A crash-looping operator: an argument `deltafleet operator` refuses (exit 2 at once).
    k8s.helm("install", "ready", CHART, "-n", system, "--set", "watch.allNamespaces=false",
             "--set", f"watch.namespaces={{{watched}}}", "--set", "serve.backend=ray-api", "--set", "serve.auth=none",
             "--set", f"tests.operatorReadyTimeoutSeconds={READY_TIMEOUT_S}",
             "--set", "operator.extraArgs={--no-such-flag}",
             "--set", f"crds.enabled={str(own_crd).lower()}")
    yield {"system": system, "watched": watched}
    k8s.helm("uninstall", "ready", "-n", system, "--wait", check=False)
    if own_crd:
        k8s.kubectl("delete", "crd", "finetunes.deltafleet.dev", "--wait=true", "--timeout=60s", check=False)
    for ns in (system, watched):
        k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_test_fails_while_the_operator_crash_loops_and_passes_once_it_is_available(k8s, release):
    system = release["system"]
    out = k8s.helm("test", "ready", "-n", system, "--timeout", "120s", check=False)
    log = k8s.pod_log(system, "ready-deltafleet-test-operator-ready")
    assert out.returncode != 0, out.stdout + out.stderr
    assert f"the operator Deployment {system}/ready-deltafleet is not available after {READY_TIMEOUT_S} s" in log, log
    # The access check passed (it exits non-zero unless FineTunes are readable and Secrets not).
    assert helm_test_phases(out.stdout).get("ready-deltafleet-test-access") == "Succeeded", out.stdout + out.stderr
    restarts = k8s.kubectl("-n", system, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                           "-o", "jsonpath={.items[*].status.containerStatuses[*].restartCount}").stdout.split()
    assert restarts and int(restarts[0]) > 0, restarts  # it did crash-loop meanwhile

    # The same release with an operator that starts: the test passes.
    # (the check waits as long as a user's default would: a loaded 2-core machine can take
    # longer than the 20 s above to start the new pod and keep it ready for minReadySeconds)
    k8s.helm("upgrade", "ready", CHART, "-n", system, "--reuse-values", "--set-json", "operator.extraArgs=[]",
             "--set", "tests.operatorReadyTimeoutSeconds=120")
    out = k8s.helm("test", "ready", "-n", system, "--timeout", "120s", check=False)
    if out.returncode != 0:
        pods = k8s.kubectl("-n", system, "get", "pods", "-o", "wide", check=False).stdout
        operator = k8s.kubectl("-n", system, "logs", "deployment/ready-deltafleet", "--tail=40", check=False)
        deployment = k8s.kubectl("-n", system, "get", "deployment", "ready-deltafleet", "-o", "yaml", check=False).stdout
        pytest.fail(out.stdout + out.stderr + k8s.pod_log(system, "ready-deltafleet-test-operator-ready")
                    + f"\n--- pods ---\n{pods}\n--- operator log ---\n{operator.stdout}{operator.stderr}\n--- deployment ---\n{deployment}")
