"""The reconciler's decisions as pure functions: table tests named by sentences (cert-manager style)."""

from __future__ import annotations

import pytest

from op_factories import compress_result
from deltafleet.operator import api
from deltafleet.operator.backend import AppStatus, ReplicaReport, TenantState
from deltafleet.operator.conditions import FALSE, TRUE, Reason
from deltafleet.operator.decisions import (Attempt, PoolView, Ref, RetryPolicy, ServedAs, decide_compression, decide_gate,
                                           decide_serving, parse_time)
from deltafleet.operator.jobs import JobState, Outcome

RUNNING, SUCCEEDED, FAILED = JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED

T0 = parse_time("2026-01-01T00:00:00Z")
RESULT = compress_result("file:///models/deltas/team-a/bot/g1/delta.safetensors", retained=0.98)


def attempt(n: int, state: str, finished: str = "2026-01-01T00:00:00Z", result=None, gen: int = 1, reason: str = "exit code 1"):
    name = f"bot-compress-g{gen}" + (f"-r{n}" if n else "")
    return Attempt(name, gen, n, Outcome(state, reason if state == FAILED else "", finished if state != RUNNING else "", result))


def decide(attempts, now=T0, limit=3, gen=1):
    return decide_compression(Ref("team-a", "bot"), attempts, gen, now, RetryPolicy(backoff_limit=limit, base_s=10, max_s=300))


COMPRESSION = [
    ("no Job yet: the first attempt is created",
     [], T0, (FALSE, Reason.JOB_CREATED, "created Job bot-compress-g1 (attempt 1 of 4)"), (1, 0)),
    ("a running Job is waited on",
     [attempt(0, RUNNING)], T0, (FALSE, Reason.JOB_CREATED, "Job bot-compress-g1 is compressing (attempt 1 of 4)"), None),
    ("a failed attempt waits out its backoff before the retry",
     [attempt(0, FAILED)], T0 + 5, (FALSE, Reason.JOB_FAILED_RETRYING, "next attempt after 2026-01-01T00:00:10Z"), None),
    ("a failed attempt past its backoff starts the retry",
     [attempt(0, FAILED)], T0 + 11, (FALSE, Reason.JOB_FAILED_RETRYING, "created Job bot-compress-g1-r1 (attempt 2 of 4)"), (1, 1)),
    ("the backoff doubles with each failure",
     [attempt(0, FAILED), attempt(1, FAILED)], T0 + 15, (FALSE, Reason.JOB_FAILED_RETRYING, "next attempt after 2026-01-01T00:00:20Z"), None),
    ("a running retry keeps the last failure in the message",
     [attempt(0, FAILED), attempt(1, RUNNING)], T0, (FALSE, Reason.JOB_FAILED_RETRYING, "attempt 1 of 4 failed (bot-compress-g1): exit code 1"), None),
    ("the last allowed failure gives up",
     [attempt(i, FAILED) for i in range(4)], T0 + 10_000, (FALSE, Reason.BACKOFF_LIMIT_EXCEEDED, "all 4 attempts failed"), None),
    ("a Job that succeeded without a readable result counts as a failure",
     [attempt(0, SUCCEEDED)], T0 + 11, (FALSE, Reason.JOB_FAILED_RETRYING, "ResultUnreadable"), (1, 1)),
    ("retries keep the generation of the first attempt",
     [attempt(0, FAILED, gen=1)], T0 + 11, (FALSE, Reason.JOB_FAILED_RETRYING, "bot-compress-g1-r1"), (1, 1)),
]


@pytest.mark.parametrize("sentence,attempts,now,want,create", COMPRESSION, ids=[c[0] for c in COMPRESSION])
def test_compression(sentence, attempts, now, want, create):
    gen = 3 if "generation" in sentence else 1  # the FineTune moved on (a serving-only change)
    d = decide(attempts, now=now, gen=gen)
    assert (d.status, d.reason) == want[:2]
    assert want[2] in d.message
    assert d.create == create
    assert "delta" not in d.fields


def test_a_succeeded_attempt_records_its_delta_and_leaves_the_condition_to_the_gate():
    d = decide([attempt(0, FAILED), attempt(1, SUCCEEDED, result=RESULT)])
    assert d.status is None and d.create is None
    assert d.fields["job"] == "bot-compress-g1-r1"
    assert d.fields["delta"]["uri"] == "file:///models/deltas/team-a/bot/g1/delta.safetensors"
    assert d.fields["delta"]["fidelity"]["retainedImprovement"] == 0.98


def test_retries_are_counted_in_the_status():
    assert decide([attempt(0, FAILED), attempt(1, RUNNING)]).fields == {"retries": 1, "job": "bot-compress-g1-r1"}


GATE = [
    ("a delta above the floor is ready", 0.98, 0.9, TRUE, Reason.DELTA_READY),
    ("a delta at the floor is ready", 0.9, 0.9, TRUE, Reason.DELTA_READY),
    ("a delta below the floor is never served", 0.5, 0.9, FALSE, Reason.FIDELITY_BELOW_THRESHOLD),
]


@pytest.mark.parametrize("sentence,retained,floor,status,reason", GATE, ids=[g[0] for g in GATE])
def test_gate(sentence, retained, floor, status, reason):
    delta = api.DeltaStatus.from_result(RESULT.model_copy(update={"fidelity": RESULT.fidelity.model_copy(update={"retained_improvement": retained})}))
    d = decide_gate(delta, floor)
    assert (d.status, d.reason) == (status, reason)


READY_ON_REPLICA = ReplicaReport({"team-a/bot": TenantState("ready")}, replica="r1")
RUNNING_APP = AppStatus("RUNNING", "", frozenset({"team-a/bot"}), READY_ON_REPLICA)


def running(report: ReplicaReport | None, tenants=frozenset({"team-a/bot"})) -> AppStatus:
    return AppStatus("RUNNING", "", tenants, report)


def serve(model, conflict, app, error, keys_problem=None):
    """decide_serving for tenant `model` of pool p (digest h1, endpoints under http://svc:8000)."""
    return decide_serving(ServedAs(model, "p", "http://svc:8000", "no delta yet", keys_problem), PoolView(app, conflict, "h1", error))


SERVING = [
    ("an unreachable backend is reported, not raised", "team-a/bot", None, RUNNING_APP, "connection refused",
     FALSE, Reason.BACKEND_UNAVAILABLE, None),
    ("a FineTune without a servable delta waits for one", None, None, None, None, FALSE, Reason.WAITING_FOR_DELTA, None),
    ("a tenant whose pool serves another base is refused", "team-a/bot", "pool p serves base x", RUNNING_APP, None,
     FALSE, Reason.POOL_BASE_CONFLICT, None),
    ("a running application whose replica has the tenant ready serves it", "team-a/bot", None, RUNNING_APP, None,
     TRUE, Reason.APPLICATION_RUNNING, "http://svc:8000/p/v1"),
    ("a running application whose backend cannot list tenants serves a tenant its replica has ready", "team-a/bot", None,
     running(READY_ON_REPLICA, tenants=None), None, TRUE, Reason.APPLICATION_RUNNING, "http://svc:8000/p/v1"),
    ("a tenant its replica is still loading is not served yet", "team-a/bot", None,
     running(ReplicaReport({"team-a/bot": TenantState("loading")})), None, FALSE, Reason.TENANT_LOADING, None),
    ("a tenant whose delta failed to load on the replica is not served", "team-a/bot", None,
     running(ReplicaReport({"team-a/bot": TenantState("failed", "no such file")})), None, FALSE, Reason.TENANT_LOAD_FAILED, None),
    ("a tenant the replica does not hold yet is loading", "team-a/bot", None,
     running(ReplicaReport({"team-a/other": TenantState("ready")})), None, FALSE, Reason.TENANT_LOADING, None),
    ("a running application whose tenant states cannot be read is not serving", "team-a/bot", None,
     running(ReplicaReport(None, "connection refused")), None, FALSE, Reason.REPLICA_STATUS_UNAVAILABLE, None),
    ("a running application whose tenant states were never read is not serving", "team-a/bot", None,
     running(None), None, FALSE, Reason.REPLICA_STATUS_UNAVAILABLE, None),
    ("another tenant's failure does not stop a ready one", "team-a/bot", None,
     running(ReplicaReport({"team-a/bot": TenantState("ready"), "team-a/x": TenantState("failed", "bad")})), None,
     TRUE, Reason.APPLICATION_RUNNING, "http://svc:8000/p/v1"),
    ("a running application that does not list the tenant yet is not serving it",
     "team-a/bot", None, AppStatus("RUNNING", "", frozenset({"team-a/other"})), None, FALSE, Reason.CONFIG_APPLIED, None),
    ("a failed application says why", "team-a/bot", None, AppStatus("DEPLOY_FAILED", "boom\n", None), None,
     FALSE, Reason.APPLICATION_FAILED, None),
    ("an application not reported yet is waited on", "team-a/bot", None, None, None, FALSE, Reason.CONFIG_APPLIED, None),
    ("an application KubeRay gave up on is failed", "team-a/bot", None,
     AppStatus("DEPLOY_FAILED", "first install: RayService InitializingTimeout: timeout of 10m", None), None,
     FALSE, Reason.APPLICATION_FAILED, None),
    ("during an upgrade the serving cluster's replica keeps a ready tenant served", "team-a/bot", None,
     AppStatus("RUNNING", "upgrade in progress: a serves while KubeRay prepares b (there: DEPLOYING)", None,
               READY_ON_REPLICA), None, TRUE, Reason.APPLICATION_RUNNING, "http://svc:8000/p/v1"),
    ("a first install that failed on the new cluster says why", "team-a/bot", None,
     AppStatus("DEPLOY_FAILED", "first install, on the new cluster b: no GPU", None), None,
     FALSE, Reason.APPLICATION_FAILED, None),
]


def test_what_kuberay_says_while_it_initializes_is_in_the_served_message():
    app = AppStatus("", "first install: RayService Initializing: RayService is initializing", None)
    d = serve("team-a/bot", None, app, None)
    assert (d.status, d.reason) == (FALSE, Reason.CONFIG_APPLIED)
    assert d.message == ("serve config h1 applied; application 'p': not reported yet "
                         "(first install: RayService Initializing: RayService is initializing)")


def test_an_upgrade_in_progress_is_in_the_served_message():
    app = AppStatus("RUNNING", "upgrade in progress: a serves while KubeRay prepares b (there: DEPLOYING)", None, READY_ON_REPLICA)
    d = serve("team-a/bot", None, app, None)
    assert d.status == TRUE and "upgrade in progress" in d.message


@pytest.mark.parametrize("sentence,model,conflict,app,error,status,reason,endpoint", SERVING, ids=[s[0] for s in SERVING])
def test_serving(sentence, model, conflict, app, error, status, reason, endpoint):
    d = serve(model, conflict, app, error)
    assert (d.status, d.reason) == (status, reason)
    if status == TRUE or "endpoint" in d.fields:
        assert d.fields.get("endpoint") == endpoint


def test_a_failed_load_shows_the_replicas_own_error_and_which_replica():
    report = ReplicaReport({"team-a/bot": TenantState(
        "failed", "replica abc123: /models/deltas/team-a/bot/g1/delta.safetensors: No such file\n", replicas=1)},
        replica="ingress-1", replicas=2)
    d = serve("team-a/bot", None, running(report), None)
    assert (d.status, d.reason) == (FALSE, Reason.TENANT_LOAD_FAILED)
    assert d.message == ("model 'team-a/bot' failed to load in application 'p': "
                         "replica abc123: /models/deltas/team-a/bot/g1/delta.safetensors: No such file")
    assert "endpoint" not in d.fields and d.fields["replicas"] == 1


def test_a_served_tenant_says_how_many_replicas_hold_it_now():
    report = ReplicaReport({"team-a/bot": TenantState("ready", replicas=2)}, replica="ingress-1", replicas=8)
    d = serve("team-a/bot", None, running(report), None)
    assert d.status == TRUE and d.fields["replicas"] == 2 and d.message.endswith("(held by 2 of 8 replicas now)")
    idle = ReplicaReport({"team-a/bot": TenantState("ready", replicas=0)}, replica="ingress-1", replicas=8)
    d = serve("team-a/bot", None, running(idle), None)  # loaded once (its delta loads); no replica holds it now
    assert d.status == TRUE and d.fields["replicas"] == 0


def test_unreadable_tenant_states_say_why():
    d = serve("team-a/bot", None, running(ReplicaReport(None, "GET http://svc:8000/p/-/tenants: HTTP 404")), None)
    assert d.reason == Reason.REPLICA_STATUS_UNAVAILABLE and d.message.endswith("cannot be read: GET http://svc:8000/p/-/tenants: HTTP 404")


def test_a_pod_that_cannot_start_is_reported_with_its_reason_instead_of_compressing():
    stuck = Attempt("bot-compress-g1", 1, 0, Outcome(RUNNING, waiting="ImagePullBackOff: back-off pulling image x"))
    d = decide([stuck])
    assert (d.status, d.reason) == (FALSE, Reason.POD_CANNOT_START)
    assert "Job bot-compress-g1's pod cannot start (attempt 1 of 4): ImagePullBackOff: back-off pulling image x" == d.message
    assert d.create is None


def _pod(waiting=None, terminated=None, scheduled=None):
    state = {"waiting": waiting} if waiting else {"terminated": terminated} if terminated else {"running": {}}
    conds = [{"type": "PodScheduled", **scheduled}] if scheduled else []
    return {"status": {"containerStatuses": [{"name": "compress", "state": state}], "conditions": conds}}


RUNNING_JOB = {"status": {"conditions": []}}
FAILED_JOB = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
POD_STATES = [
    ("an image that cannot be pulled", RUNNING_JOB, _pod(waiting={"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}),
     RUNNING, 'ImagePullBackOff: Back-off pulling image "x"'),
    ("a missing Secret", RUNNING_JOB, _pod(waiting={"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}),
     RUNNING, 'CreateContainerConfigError: secret "hf" not found'),
    ("a pod no node can take", RUNNING_JOB, {"status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes: Insufficient nvidia.com/gpu."}]}},
     RUNNING, "Unschedulable: 0/3 nodes: Insufficient nvidia.com/gpu."),
    ("a container that is merely starting", RUNNING_JOB, _pod(waiting={"reason": "ContainerCreating"}), RUNNING, ""),
    ("a running container", RUNNING_JOB, _pod(), RUNNING, ""),
    ("no pod yet", RUNNING_JOB, None, RUNNING, ""),
]


@pytest.mark.parametrize("sentence,job,pod,state,waiting", POD_STATES, ids=[p[0] for p in POD_STATES])
def test_why_a_pod_cannot_start(sentence, job, pod, state, waiting):
    from deltafleet.operator.jobs import outcome

    o = outcome(job, pod)
    assert (o.state, o.waiting) == (state, waiting)


def test_an_out_of_memory_kill_names_itself_in_the_failure():
    from deltafleet.operator.jobs import outcome

    o = outcome(FAILED_JOB, _pod(terminated={"exitCode": 137, "reason": "OOMKilled"}))
    assert o.state == FAILED and o.reason == "BackoffLimitExceeded: exit code 137: OOMKilled"


def test_a_tenant_whose_pool_needs_keys_it_has_not_got_is_not_served_and_says_why():
    d = serve(None, None, RUNNING_APP, None, keys_problem="API key Secret team-a/bot-keys not found")
    assert (d.status, d.reason, d.message) == (FALSE, Reason.API_KEYS_MISSING, "API key Secret team-a/bot-keys not found")
    assert d.fields == {"endpoint": None, "replicas": None}


POLICY = [
    ("a FineTune of the chart's defaults passes", {}, {}, []),
    ("a host path from a FineTune is refused by default", {"modelStore": {"hostPath": "//"}}, {},
     ["spec.modelStore.hostPath: FineTunes may not mount a node's files"]),
    ("a host path is allowed when the admin allows it", {"modelStore": {"hostPath": "/srv/models"}}, {"policy_host_path": "allow"}, []),
    ("an image that is not the Job image is refused", {"compression": {"image": "evil/miner:1"}}, {},
     ["spec.compression.image: 'evil/miner:1' is not an allowed image"]),
    ("the Job image itself is allowed", {"compression": {"image": "reg/deltafleet-ml:1"}}, {}, []),
    ("an image the admin lists is allowed", {"compression": {"image": "reg/custom:2"}},
     {"policy_allowed_images": "reg/other:1, reg/custom:2"}, []),
    ("more GPUs than the ceiling are refused", {"compression": {"gpus": 9}}, {}, ["spec.compression.gpus: 9 is above the policy's 8"]),
    ("memory above the ceiling is refused, in either field", {"compression": {"resources": {"requests": {"memory": "300Gi"}, "limits": {"memory": "1Ti"}}}},
     {"policy_max_memory": "256Gi"}, ["resources.requests.memory: 300Gi is above", "resources.limits.memory: 1Ti is above"]),
    ("memory at the ceiling passes", {"compression": {"resources": {"limits": {"memory": "256Gi"}}}}, {"policy_max_memory": "256Gi"}, []),
    ("GPUs asked through resource limits count against the ceiling", {"compression": {"resources": {"limits": {"nvidia.com/gpu": 16}}}},
     {}, ["spec.compression.resources.limits.nvidia.com/gpu: 16 is above the policy's 8 GPUs"]),
    ("another vendor's GPUs count too, in requests as well", {"compression": {"resources": {"requests": {"amd.com/gpu": "12"}}}},
     {}, ["spec.compression.resources.requests.amd.com/gpu: 12 is above the policy's 8 GPUs"]),
    ("GPUs in resources at the ceiling pass", {"compression": {"resources": {"limits": {"nvidia.com/gpu": 8}}}}, {}, []),
    ("a deadline above the ceiling is refused", {"activeDeadlineSeconds": 200_000}, {},
     ["spec.activeDeadlineSeconds: 200000 is above the policy's 86400"]),
    ("a tenant cannot size its pool past the replica ceiling", {"serving": {"minReplicas": 1000, "maxReplicas": 1000}}, {},
     ["spec.serving.minReplicas: 1000 is above the policy's 8 replicas", "spec.serving.maxReplicas: 1000 is above the policy's 8"]),
    ("replicas at the ceiling pass", {"serving": {"minReplicas": 2, "maxReplicas": 8}}, {}, []),
    ("the admin may raise the replica ceiling", {"serving": {"maxReplicas": 32}}, {"policy_max_replicas": 32}, []),
    ("a tenant cannot make every replica of its pool take more GPUs than the policy allows",
     {"serving": {"gpusPerReplica": 16}}, {}, ["spec.serving.gpusPerReplica: 16 is above the policy's 1"]),
    ("a fraction of a GPU within the ceiling passes", {"serving": {"gpusPerReplica": 0.5}}, {}, []),
]


@pytest.mark.parametrize("sentence,spec,settings,problems", POLICY, ids=[p[0] for p in POLICY])
def test_policy(sentence, spec, settings, problems):
    from op_factories import finetune

    from deltafleet.operator.settings import Settings
    from deltafleet.operator.validation import policy_problems

    body = {k: v for k, v in spec.items() if k != "compression"}
    if "compression" in spec:
        body["compression"] = {"steps": 2, "minFidelity": 0.5, "gpus": 0, **spec["compression"]}
    got = policy_problems(finetune(spec=body), Settings(job_image="reg/deltafleet-ml:1", **settings))
    assert len(got) == len(problems), got
    for want, line in zip(problems, got):
        assert want in line and "policy" in line, line
