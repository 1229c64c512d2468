"""High availability against the real control plane: two `deltafleet operator` replicas share
the chart's kopf peering object (the chart installed with operator.replicas=2, each replica
acting with the chart's ServiceAccount and its peering RBAC). The oldest acts, the other
stands by; when the active one is SIGKILLed the standby reconciles a new FineTune within the
peering lifetime plus slack; when it stops normally it leaves the peering at once."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
import uuid

import pytest
from op_harness import CHART, FineTunes, OperatorProcess, finetune_yaml, free_port, wait_for

from cluster.fixtures import NO_CHART_OPERATOR

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Jobs here need to exist, not to run: their pods wait on an image no registry serves.
NOT_PULLED = "deltafleet.test/compress-not-run:1"
RELEASE = "deltafleet-ha"  # its full name too: the ServiceAccount and the peering object
LIFETIME = 10  # the chart's default operator.peering.lifetime
# Takeover after a SIGKILL: at most LIFETIME for the dead replica's keep-alive to expire, then
# a re-list and one reconcile; generous for a loaded 2-core machine.
TAKEOVER_BOUND_S = LIFETIME + 35


@pytest.fixture
def ha(k8s, chart, namespace):
    """The chart with two replicas watching the test's namespace (its Deployment's pods never
    start: the test runs the replicas itself, as the chart's ServiceAccount)."""
    system = k8s.create_namespace(f"ha-system-{uuid.uuid4().hex[:5]}")
    k8s.helm("install", RELEASE, CHART, "-n", system, *NO_CHART_OPERATOR, "--set", "operator.replicas=2",
             "--set", "watch.allNamespaces=false", "--set", f"watch.namespaces={{{namespace}}}",
             "--set", "crds.enabled=false", "--set", "serve.backend=ray-api", "--set", "serve.auth=none",
             "--set", "tests.enabled=false")
    yield k8s.sa_kubeconfig(system, RELEASE)
    k8s.helm("uninstall", RELEASE, "-n", system, check=False)
    k8s.kubectl("delete", "namespace", system, "--wait=false", check=False)


def peers(k8s, namespace: str) -> dict:
    r = k8s.kubectl("-n", namespace, "get", "kopfpeering", RELEASE, "-o", "json", check=False)
    return (json.loads(r.stdout).get("status") or {}) if r.returncode == 0 else {}


def reconciled(fts: FineTunes, name: str):
    """The operator acted on it: its compression Job exists and it has a phase."""
    ft = fts.get(name) or {}
    return f"{name}-compress-g1" in fts.job_names() and (ft.get("status") or {}).get("phase") and ft


def reconciles(op: OperatorProcess) -> float:
    """How many reconciles this replica ran, whatever their result (its own /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("deltafleet_operator_reconciles_total{"))


def start(kubeconfig, namespace: str, tmp_path, *extra: str) -> OperatorProcess:
    args = ["--serve-backend", "ray-api", "-n", namespace, "--serve-auth", "none",
            "--store-host-path", str(tmp_path), "--operator-store-path", str(tmp_path),
            "--job-image", NOT_PULLED, "--resync-seconds", "2", "--retry-base-seconds", "60",
            "--peering", RELEASE, "--peering-lifetime", str(LIFETIME), *extra]
    metrics_port = free_port()
    proc = OperatorProcess(kubeconfig, args + ["--metrics-port", str(metrics_port)], tmp_path).start()
    proc.metrics_port = metrics_port
    wait_for(lambda: proc.healthy() or proc.proc.poll() is not None, 60, "the operator's /healthz", on_timeout=proc.log)
    assert proc.proc.poll() is None, proc.log()
    return proc


def sigkill(op: OperatorProcess) -> None:
    os.killpg(op.proc.pid, signal.SIGKILL)  # its own session: only the process this test started
    op.proc.wait(timeout=10)


@pytest.fixture
def replicas(ha, namespace, tmp_path):
    started: list[OperatorProcess] = []

    def run(*extra: str) -> OperatorProcess:
        started.append(start(ha, namespace, tmp_path, *extra))
        return started[-1]

    yield run
    for op in started:
        op.stop()


def two_replicas(k8s, namespace, replicas):
    """The first replica, then (strictly younger) the second; both keep-alives in the peering object."""
    first = replicas()
    wait_for(lambda: len(peers(k8s, namespace)) == 1, 60, "the first replica's keep-alive", on_timeout=first.log)
    second = replicas()
    wait_for(lambda: len(peers(k8s, namespace)) == 2, 60, "both replicas' keep-alives",
             on_timeout=lambda: first.log() + "\n" + second.log())
    # kopf starts a peered replica paused until it has read the peering object; a younger one
    # never resumes while the older one's keep-alive is live.
    return first, second


def test_two_replicas_the_oldest_acts_and_the_other_takes_over_within_seconds_of_a_sigkill(k8s, namespace, replicas, tmp_path):
    fts = FineTunes(k8s, namespace, tmp_path)
    active, standby = two_replicas(k8s, namespace, replicas)
    prio = {identity: p["priority"] for identity, p in peers(k8s, namespace).items()}
    assert len(set(prio.values())) == 2, prio  # distinct: kopf would pause both on a tie

    fts.apply(finetune_yaml("before", namespace, base="bases/none"))
    wait_for(lambda: reconciled(fts, "before"), 120, "the active replica to reconcile `before`", on_timeout=active.log)
    time.sleep(3)  # a resync or two: the standby would have acted by now if it were not paused
    assert reconciles(active) > 0, active.log()
    assert reconciles(standby) == 0, standby.log()
    assert fts.job_names() == ["before-compress-g1"]

    sigkill(active)  # no goodbye: its keep-alive stays in the peering object until it expires
    killed_at = time.monotonic()
    fts.apply(finetune_yaml("after", namespace, base="bases/none"))
    wait_for(lambda: reconciled(fts, "after"), TAKEOVER_BOUND_S, "the standby to take over and reconcile `after`",
             on_timeout=standby.log)
    took = time.monotonic() - killed_at
    print(f"takeover after SIGKILL: {took:.1f} s (peering lifetime {LIFETIME} s)")
    assert reconciles(standby) > 0, standby.log()
    assert "Resuming the watch-stream for finetunes" in standby.log_path.read_text(), standby.log()
    assert sorted(fts.job_names()) == ["after-compress-g1", "before-compress-g1"]
    # the dead replica's keep-alive is cleaned out by the survivor
    wait_for(lambda: len(peers(k8s, namespace)) == 1, 30, "the dead replica's keep-alive to be cleaned")


def test_a_replica_that_stops_normally_leaves_the_peering_and_the_standby_acts_at_once(k8s, namespace, replicas, tmp_path):
    """SIGTERM (a rollout, a drain): the active replica removes its keep-alive as it exits, so
    the standby does not wait for the lifetime to run out."""
    fts = FineTunes(k8s, namespace, tmp_path)
    active, standby = two_replicas(k8s, namespace, replicas)
    active.stop()  # SIGTERM
    stopped_at = time.monotonic()
    fts.apply(finetune_yaml("handover", namespace, base="bases/none"))
    wait_for(lambda: reconciled(fts, "handover"), 60, "the standby to reconcile `handover`", on_timeout=standby.log)
    took = time.monotonic() - stopped_at
    print(f"handover after SIGTERM: {took:.1f} s (peering lifetime {LIFETIME} s)")
    assert reconciles(standby) > 0, standby.log()
    assert len(peers(k8s, namespace)) == 1
    assert took < LIFETIME, f"the standby waited {took:.1f} s: the stopped replica did not leave the peering"


def test_a_replica_without_its_peering_object_stays_paused(k8s, namespace, ha, tmp_path):
    """Peering is mandatory: a replica that cannot see its peering object (here: one named for
    another release) never acts beside a possibly active one."""
    fts = FineTunes(k8s, namespace, tmp_path)
    op = start(ha, namespace, tmp_path, "--peering", "no-such-peering")
    try:
        fts.apply(finetune_yaml("orphan", namespace, base="bases/none"))
        time.sleep(8)
        assert fts.job_names() == [] and not (fts.get("orphan") or {}).get("status"), op.log()
        assert reconciles(op) == 0
    finally:
        op.stop()


def test_two_replicas_started_at_the_same_moment_never_both_reconcile(k8s, namespace, ha, tmp_path):
    """The start-up race: kopf lists the peering object while it writes its first keep-alive,
    so two replicas starting together could each miss the other and both act for a moment
    (measured before `announce_peer`: 1 start in 4). Each replica now writes its keep-alive
    before kopf starts, so the younger one always starts paused."""
    fts = FineTunes(k8s, namespace, tmp_path)
    for i in range(3):
        fts.apply(finetune_yaml(f"waiting-{i}", namespace, base="bases/none"))
    for trial in range(3):
        pair = []
        for _ in range(2):  # both started before either is up
            port = free_port()
            op = OperatorProcess(ha, ["--serve-backend", "ray-api", "-n", namespace, "--serve-auth", "none",
                                      "--store-host-path", str(tmp_path), "--job-image", NOT_PULLED,
                                      "--resync-seconds", "1", "--retry-base-seconds", "60",
                                      "--peering", RELEASE, "--metrics-port", str(port)], tmp_path)
            op.metrics_port = port
            pair.append(op.start())
        try:
            wait_for(lambda: all(op.healthy() for op in pair), 60, "both replicas' /healthz",
                     on_timeout=lambda: "\n".join(op.log() for op in pair))
            wait_for(lambda: sum(reconciles(op) > 0 for op in pair), 60, "one replica to reconcile")
            time.sleep(5)  # several resyncs of three FineTunes
            counts = [reconciles(op) for op in pair]
            assert sorted(c > 0 for c in counts) == [False, True], (trial, counts)
        finally:
            for op in pair:
                op.stop()


def test_a_cluster_wide_replica_writes_its_keep_alive_into_the_charts_cluster_peering_with_its_rbac(k8s, chart, tmp_path):
    """All namespaces: the chart makes a ClusterKopfPeering and may only patch that one; the
    keep-alive written before kopf starts lands there (no operator is started: it would act
    on every namespace of the shared test cluster)."""
    from kubernetes import client

    from deltafleet.operator.cli import announce_peer
    from deltafleet.operator.settings import parse_settings

    system, release = k8s.create_namespace(f"hacw-system-{uuid.uuid4().hex[:5]}"), "deltafleet-hacw"
    k8s.helm("install", release, CHART, "-n", system, *NO_CHART_OPERATOR, "--set", "operator.replicas=2", "--set", "crds.enabled=false",
             "--set", "serve.backend=ray-api", "--set", "tests.enabled=false")
    try:
        settings, _ = parse_settings(["--peering", release])
        with k8s.api(k8s.sa_kubeconfig(system, release)) as api:
            announce_peer(api, settings, "replica-a", 42)
            with pytest.raises(client.exceptions.ApiException) as denied:  # another release's peering: not ours
                client.CustomObjectsApi(api).patch_cluster_custom_object(
                    "kopf.dev", "v1", "clusterkopfpeerings", "deltafleet-other", {"status": {}},
                    _content_type="application/merge-patch+json")
            assert denied.value.status == 403
        status = json.loads(k8s.kubectl("get", "clusterkopfpeering", release, "-o", "json").stdout)["status"]
        assert status["replica-a"]["priority"] == 42 and status["replica-a"]["lifetime"] == LIFETIME
    finally:
        k8s.helm("uninstall", release, "-n", system, check=False)
        k8s.kubectl("delete", "namespace", system, "--wait=false", check=False)
