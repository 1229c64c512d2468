"""The chart installed into the real test control plane: the CRD is served with its columns,
the API server itself refuses bad FineTunes, and the operator's ServiceAccount can do exactly
what the operator needs."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml

from cluster.fixtures import NO_CHART_OPERATOR, helm_test_phases

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "deltafleet"
SYSTEM, WATCHED, OTHER = "k8sapi-system", ("k8sapi-a", "k8sapi-b"), "k8sapi-other"
CLUSTER_WIDE = "k8sapi-cw"
SA = "df-deltafleet"  # <release>-<chart>


# Every test here runs on the pinned Kubernetes (1.37) and again on the oldest supported minor
# (the skew check, 1.35): the CRD's schema and CEL rules, the chart and its RBAC on both.
@pytest.fixture(scope="module", params=["k8s", "k8s_skew"], ids=["current", "skew"])
def release(request):
    """The chart, watching two namespaces; a second release (no CRD) watching all of them.
    The session's cluster is shared: when another release already installed the CRD, this
    one leaves it to that owner (Helm refuses to take it over) and tests the same object."""
    k8s = request.getfixturevalue(request.param)
    store = request.getfixturevalue("tmp_path_factory").mktemp("store")  # what the operator pod mounts
    namespaces = (SYSTEM, *WATCHED, OTHER, CLUSTER_WIDE)
    for ns in namespaces:
        k8s.create_namespace(ns)
    own_crd = k8s.kubectl("get", "crd", "finetunes.deltafleet.dev", check=False).returncode != 0
    # Neither release's operator may act: the tests run `deltafleet operator` themselves. df's
    # pod crash-loops on an argument it refuses (its helm test hooks run from the same image).
    k8s.helm("install", "df", CHART, "-n", SYSTEM, "--set", "watch.allNamespaces=false",
             "--set", "watch.namespaces={" + ",".join(WATCHED) + "}", "--set", f"modelStore.hostPath={store}",
             "--set", f"crds.enabled={str(own_crd).lower()}", "--set", "tests.operatorReadyTimeoutSeconds=5",
             "--set", "operator.extraArgs={--no-such-flag}")
    k8s.helm("install", "dfc", CHART, "-n", CLUSTER_WIDE, *NO_CHART_OPERATOR, "--set", "crds.enabled=false",
             "--set", "serve.backend=ray-api", "--set", "tests.enabled=false")
    wait_for(lambda: "Established=True" in k8s.kubectl(
        "get", "crd", "finetunes.deltafleet.dev", "-o",
        'jsonpath={range .status.conditions[*]}{.type}={.status}{"\\n"}{end}').stdout, "the CRD to be established")
    yield k8s
    # Leave the cluster as found: later modules install the chart (and its CRD) themselves.
    for ns in (*WATCHED, OTHER):
        k8s.kubectl("delete", "finetunes.deltafleet.dev", "--all", "-n", ns, "--wait=false", check=False)
    k8s.helm("uninstall", "dfc", "-n", CLUSTER_WIDE, check=False)
    k8s.helm("uninstall", "df", "-n", SYSTEM, check=False)
    if own_crd:  # helm.sh/resource-policy: keep left it behind, owned by a release that is gone
        k8s.kubectl("delete", "crd", "finetunes.deltafleet.dev", "--wait=true", "--timeout=60s", check=False)
    for ns in namespaces:
        k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def wait_for(check, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not there yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def finetune(name: str, **spec) -> dict:
    ft = yaml.safe_load((ROOT / "examples/finetune.yaml").read_text())
    ft["metadata"] = {"name": name, "namespace": WATCHED[0]}
    ft["spec"].update(spec)
    return ft


def apply(k8s, obj: dict, verb: str = "create", *flags: str):
    return k8s.kubectl(verb, "-f", "-", *flags, input=json.dumps(obj), check=False)


# ---------------------------------------------------------------- the CRD is served


def test_the_api_server_runs_the_pinned_release(release):
    server = json.loads(release.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"] == f"v{release.version}"


def test_chart_installed_the_generated_crd(release):
    served = json.loads(release.kubectl("get", "crd", "finetunes.deltafleet.dev", "-o", "json").stdout)
    generated = yaml.safe_load((ROOT / "crds/finetunes.deltafleet.dev.yaml").read_text())
    assert served["spec"]["versions"] == generated["spec"]["versions"]
    assert served["spec"]["names"] == generated["spec"]["names"]
    assert served["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_get_ft_prints_the_columns(release):
    ft = finetune("columns")
    assert apply(release, ft).returncode == 0
    status = {
        "status": {
            "observedGeneration": 1,
            "phase": "Serving",
            "pool": "llama2-7b",
            "endpoint": "http://serve.ray:8000/llama2-7b/v1",
            "conditions": [
                {"type": t, "status": "True", "reason": "Done", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                for t in ("Compressed", "Served", "Ready")
            ],
            "delta": {"uri": "file:///models/d.safetensors", "bytes": 100, "compressionRatio": 15.8, "fidelity": {"retainedImprovement": 0.96}},
        }
    }
    release.kubectl("patch", "ft", "columns", "-n", WATCHED[0], "--subresource=status", "--type=merge", "-p", json.dumps(status))
    table = release.kubectl("get", "ft", "columns", "-n", WATCHED[0]).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "PHASE", "BASE", "AGE"]
    assert table[1].split()[:4] == ["columns", "True", "Serving", "meta-llama/Llama-2-7b-hf"]
    wide = release.kubectl("get", "ft", "columns", "-n", WATCHED[0], "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "READY", "PHASE", "BASE", "AGE", "POOL", "FIDELITY", "RATIO", "ENDPOINT"]
    assert wide[1].split()[5:] == ["llama2-7b", "0.96", "15.8", "http://serve.ray:8000/llama2-7b/v1"]
    # the category and the short name; `kubectl get all` does not list model resources
    assert "columns" in release.kubectl("get", "deltafleet", "-n", WATCHED[0]).stdout
    assert "finetune" not in release.kubectl("get", "all", "-n", WATCHED[0]).stdout


def test_server_fills_defaults(release):
    assert apply(release, finetune("defaults", compression={}, serving={})).returncode == 0
    spec = json.loads(release.kubectl("get", "ft", "defaults", "-n", WATCHED[0], "-o", "json").stdout)["spec"]
    assert spec["compression"]["steps"] == 200 and spec["compression"]["minFidelity"] == 0.9
    assert spec["compression"]["calibration"] == {"samples": 800, "seqLen": 128}
    assert spec["serving"] == {"minReplicas": 1, "maxReplicas": 4, "gpusPerReplica": 1}  # targetOngoingRequests: the pool derives it
    assert spec["deletionPolicy"] == "Delete" and spec["backoffLimit"] == 3


def test_explain_documents_serving(release):
    def explained():
        out = release.kubectl("explain", "finetune.spec.serving", check=False)
        return out.returncode == 0 and out.stdout

    wait_for(explained, "kubectl explain (the CRD's OpenAPI is published)", 30)
    text = " ".join(release.kubectl("explain", "finetune.spec.serving").stdout.split())
    for field, words in [("pool", "Ray Serve application"), ("modelName", "Model name clients send"),
                         ("minReplicas", "Fewest replicas"), ("targetOngoingRequests", "ongoing requests per replica")]:
        assert field in text and words in text, field


# ---------------------------------------------------------------- the API server refuses bad FineTunes


def without(obj: dict, *path: str) -> dict:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return obj


def with_(obj: dict, value, *path: str) -> dict:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return obj


BAD = [
    ("missing baseModel", without(finetune("bad"), "spec", "baseModel"), ["spec.baseModel", "Required value"]),
    ("wrong type", with_(finetune("bad"), "many", "spec", "compression", "steps"), ["spec.compression.steps", "must be of type integer"]),
    ("out of range", with_(finetune("bad"), 1.5, "spec", "compression", "minFidelity"), ["spec.compression.minFidelity", "less than or equal to 1"]),
    ("negative", with_(finetune("bad"), -1, "spec", "serving", "minReplicas"), ["spec.serving.minReplicas", "greater than or equal to 0"]),
    ("enum", with_(finetune("bad"), "Orphan", "spec", "deletionPolicy"), ["spec.deletionPolicy", "supported values"]),
    ("two sources", with_(finetune("bad"), {"huggingFace": "a/b", "path": "b"}, "spec", "baseModel"), ["spec.baseModel", "exactly one of huggingFace or path"]),
    ("no source", with_(finetune("bad"), {}, "spec", "fineTunedModel"), ["spec.fineTunedModel", "exactly one of huggingFace or path"]),
    ("path escape", with_(finetune("bad"), {"path": "models/../../etc"}, "spec", "fineTunedModel"), ["spec.fineTunedModel.path", "'..'"]),
    ("min > max", with_(finetune("bad"), {"minReplicas": 5, "maxReplicas": 2}, "spec", "serving"), ["spec.serving.minReplicas", "minReplicas must be <= maxReplicas"]),
    ("quantity", with_(finetune("bad"), {"requests": {"memory": "lots"}}, "spec", "compression", "resources"), ["spec.compression.resources.requests.memory", "should match"]),
    ("unknown field", with_(finetune("bad"), 1, "spec", "surprise"), ['unknown field "spec.surprise"']),
    ("long name", with_(finetune("bad"), "x" * 41, "metadata", "name"), ["metadata.name must be at most 40 characters"]),
    ("reserved model name", with_(finetune("bad"), {"modelName": "base"}, "spec", "serving"),
     ["spec.serving.modelName", "reserved for the pool's base model"]),
    ("model name is the pool", with_(finetune("bad"), {"pool": "p1", "modelName": "p1"}, "spec", "serving"),
     ["spec.serving.modelName", "must differ from pool"]),
    ("fine-tune is the base", with_(finetune("bad"), finetune("bad")["spec"]["baseModel"], "spec", "fineTunedModel"),
     ["spec.fineTunedModel", "same model as baseModel"]),
]


@pytest.mark.parametrize("obj, words", [(o, w) for _, o, w in BAD], ids=[i for i, _, _ in BAD])
def test_api_server_refuses(release, obj, words):
    out = apply(release, obj, "create", "--dry-run=server")
    assert out.returncode != 0, f"accepted: {out.stdout}"
    for word in words:
        assert word in out.stderr, out.stderr


@pytest.mark.parametrize("example", ["finetune.yaml", "finetune-store.yaml"])
def test_the_examples_are_accepted(release, example):
    obj = yaml.safe_load((ROOT / "examples" / example).read_text())
    obj["metadata"]["namespace"] = WATCHED[0]
    out = apply(release, obj, "create", "--dry-run=server")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("immutable-base", {"baseModel": {"huggingFace": "meta-llama/Llama-2-13b-hf"}}, ["spec.baseModel", "baseModel is immutable"]),
        ("immutable-pool", {"serving": {"pool": "other-pool"}}, ["spec.serving.pool", "pool is immutable"]),
        ("immutable-name", {"serving": {"pool": "llama2-7b", "modelName": "renamed"}}, ["spec.serving.modelName", "modelName is immutable once set"]),
    ],
)
def test_identity_fields_are_immutable(release, name, change, words):
    assert apply(release, finetune(name)).returncode == 0
    current = json.loads(release.kubectl("get", "ft", name, "-n", WATCHED[0], "-o", "json").stdout)
    for key, value in change.items():
        current["spec"][key] = {**current["spec"][key], **value} if key == "serving" else value
    out = apply(release, current, "replace")
    assert out.returncode != 0, "an identity field changed"
    for word in words:
        assert word in out.stderr, out.stderr


def test_a_new_fine_tune_checkpoint_is_a_new_generation(release):
    assert apply(release, finetune("newgen")).returncode == 0
    current = json.loads(release.kubectl("get", "ft", "newgen", "-n", WATCHED[0], "-o", "json").stdout)
    current["spec"]["fineTunedModel"] = {"path": "finetunes/llama2-support-sft-v2"}
    current["spec"]["serving"]["maxReplicas"] = 8
    out = apply(release, current, "replace")
    assert out.returncode == 0, out.stderr
    assert json.loads(release.kubectl("get", "ft", "newgen", "-n", WATCHED[0], "-o", "json").stdout)["metadata"]["generation"] == 2


def test_status_is_checked_too(release):
    assert apply(release, finetune("badstatus")).returncode == 0
    out = release.kubectl("patch", "ft", "badstatus", "-n", WATCHED[0], "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"phase": "Happy"}}), check=False)
    assert out.returncode != 0 and "status.phase" in out.stderr


# ---------------------------------------------------------------- RBAC of the operator's account


def can_i(k8s, kubeconfig, *args) -> bool:
    out = k8s.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stdout + out.stderr
    return out.stdout.strip() == "yes"


def can_i_raw(k8s, kubeconfig, verb, group, resource, namespace, name="") -> bool:
    """A SelfSubjectAccessReview sent directly: for groups this cluster does not serve (ray.io),
    whose names `kubectl auth can-i` cannot resolve."""
    from kubernetes import client

    attributes = client.V1ResourceAttributes(verb=verb, group=group, resource=resource, namespace=namespace, name=name)
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes))
    with k8s.api(kubeconfig) as api:
        return client.AuthorizationV1Api(api).create_self_subject_access_review(review).status.allowed


NEEDED = [
    *[(v, "finetunes.deltafleet.dev") for v in ("get", "list", "watch", "patch")],
    ("patch", "finetunes.deltafleet.dev", "--subresource=status"),
    ("update", "finetunes.deltafleet.dev", "--subresource=finalizers"),
    *[(v, "jobs.batch") for v in ("get", "list", "watch", "create", "delete")],
    *[(v, "pods") for v in ("get", "list", "watch")],
    ("get", "pods", "--subresource=log"),
    ("create", "events"),
    ("patch", "events"),
    ("get", "secrets"),  # API keys: the Secret a FineTune names
]
REFUSED = [
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("create", "pods"),
    ("delete", "finetunes.deltafleet.dev"),
    ("create", "finetunes.deltafleet.dev"),
    ("get", "configmaps"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("*", "*"),
]


@pytest.mark.parametrize("ns", WATCHED)
def test_namespaced_operator_can_do_what_it_needs(release, ns):
    kc = release.sa_kubeconfig(SYSTEM, SA)
    for args in NEEDED:
        assert can_i(release, kc, *args, "-n", ns), f"cannot {args} in {ns}"
    for verb in ("get", "patch"):
        assert can_i_raw(release, kc, verb, "ray.io", "rayservices", SYSTEM, "deltafleet"), verb


def test_namespaced_operator_can_do_nothing_else(release):
    kc = release.sa_kubeconfig(SYSTEM, SA)
    for args in REFUSED:
        assert not can_i(release, kc, *args, "-n", WATCHED[0]), f"may {args}"
    for args in NEEDED:
        assert not can_i(release, kc, *args, "-n", OTHER), f"may {args} in an unwatched namespace"
    assert not can_i(release, kc, "list", "finetunes.deltafleet.dev", "--all-namespaces")
    assert not can_i(release, kc, "list", "nodes")
    assert not can_i(release, kc, "list", "namespaces")
    assert not can_i_raw(release, kc, "patch", "ray.io", "rayservices", SYSTEM, "another")
    assert not can_i_raw(release, kc, "list", "ray.io", "rayservices", SYSTEM)
    assert not can_i_raw(release, kc, "patch", "ray.io", "rayservices", WATCHED[0], "deltafleet")
    # and the API server enforces it, not just `can-i`
    out = release.kubectl("get", "secrets", "-n", WATCHED[0], kubeconfig=kc, check=False)
    assert out.returncode != 0 and "forbidden" in out.stderr
    assert release.kubectl("get", "ft", "-n", WATCHED[0], kubeconfig=kc).returncode == 0


def test_cluster_wide_operator(release):
    kc = release.sa_kubeconfig(CLUSTER_WIDE, "dfc-deltafleet")
    for args in NEEDED:
        assert can_i(release, kc, *args, "--all-namespaces"), f"cannot {args} cluster-wide"
    for args in REFUSED:
        assert not can_i(release, kc, *args, "-n", OTHER), f"may {args}"
    assert not can_i(release, kc, "list", "nodes")
    assert not can_i_raw(release, kc, "get", "ray.io", "rayservices", OTHER, "deltafleet"), "ray-api backend needs no RayService access"


def test_helm_test_runs_with_the_operator_account(release):
    """The access check passes with the operator's account; the readiness check then fails, as
    the operator pod crash-loops here (tests/k8s/test_helm_test_waits_for_the_operator.py has
    one that starts)."""
    if release.node is None:
        pytest.skip("the skew cluster is a 1.35 control plane without a node: its hook pods never run")
    release.node.import_images()  # the operator image the hooks run from
    out = release.helm("test", "df", "-n", SYSTEM, "--timeout", "120s", check=False)
    said = f"helm test said:\n{out.stdout}{out.stderr}"
    # The access hook exits non-zero unless FineTunes are readable and Secrets not; once it
    # succeeds helm deletes it, log and all.
    assert helm_test_phases(out.stdout).get("df-deltafleet-test-access") == "Succeeded", said
    assert out.returncode != 0
    try:
        log = release.pod_log(SYSTEM, "df-deltafleet-test-operator-ready")
    except FileNotFoundError as e:
        pytest.fail(f"{e}\n{said}", pytrace=False)
    assert "is not available after 5 s" in log, said


def test_the_operator_works_with_the_namespaced_rbac(release, tmp_path):
    """The real `deltafleet operator`, configured by the chart's Deployment env and acting with
    its ServiceAccount's token: it creates the compression Job and writes status in a watched
    namespace, and never touches an unwatched one (nor hits a 403 on the way)."""
    import os
    import subprocess
    import sys

    from ports import free_port

    manifest = yaml.safe_load_all(release.helm("get", "manifest", "df", "-n", SYSTEM).stdout)
    container = next(d for d in manifest if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    assert env["DELTAFLEET_NAMESPACES"] == ",".join(WATCHED)
    env.update(
        KUBECONFIG=str(release.sa_kubeconfig(SYSTEM, SA)),
        DELTAFLEET_NAMESPACES=WATCHED[1],  # the other watched namespace holds earlier tests' objects
        DELTAFLEET_LIVENESS_PORT=str(port), DELTAFLEET_OPERATOR_STORE_PATH=str(tmp_path),
        DELTAFLEET_RESYNC_SECONDS="1", DELTAFLEET_RETRY_BASE_SECONDS="600",
        DELTAFLEET_STORE_HOST_PATH=str(tmp_path),  # the admin's store (FineTunes may not name a hostPath)
        DELTAFLEET_METRICS_PORT="0",
    )
    command = [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:]]
    spec = {"baseModel": {"path": "bases/none"}, "fineTunedModel": {"path": "finetunes/none"}, "compression": {"gpus": 0}}
    watched = {"apiVersion": "deltafleet.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "operated", "namespace": WATCHED[1]}, "spec": spec}
    unwatched = {**watched, "metadata": {"name": "ignored", "namespace": OTHER}}
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert apply(release, watched).returncode == 0 and apply(release, unwatched).returncode == 0

        def job_and_status():
            jobs = json.loads(release.kubectl("get", "jobs", "-n", WATCHED[1], "-o", "json").stdout)["items"]
            ft = json.loads(release.kubectl("get", "ft", "operated", "-n", WATCHED[1], "-o", "json").stdout)
            return any(j["metadata"]["name"].startswith("operated-compress-g1") for j in jobs) and ft.get("status", {}).get("phase")

        wait_for(job_and_status, f"the operator to create a Job and write status (log: {log})", 120)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert json.loads(release.kubectl("get", "jobs", "-n", OTHER, "-o", "json").stdout)["items"] == []
        assert "status" not in json.loads(release.kubectl("get", "ft", "ignored", "-n", OTHER, "-o", "json").stdout)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        # Nothing runs the finalizer now: release the object so the namespace can go.
        for ns, name in ((WATCHED[1], "operated"), (OTHER, "ignored")):
            release.kubectl("patch", "ft", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
            release.kubectl("delete", "ft", name, "-n", ns, "--wait=false", check=False)
    text = log.read_text()
    assert "Forbidden" not in text and " 403" not in text, text[-3000:]


def test_the_built_in_edit_and_view_roles_cover_finetunes(release):
    """A team member bound to Kubernetes' own `edit` in their namespace manages FineTunes there;
    `view` reads them; neither writes status (the operator's) or reaches another namespace."""
    ns = WATCHED[0]
    for who, role in (("alice", "edit"), ("bob", "view")):
        release.kubectl("-n", ns, "create", "serviceaccount", who)
        release.kubectl("-n", ns, "create", "rolebinding", f"{who}-{role}", f"--clusterrole={role}", f"--serviceaccount={ns}:{who}")
    alice, bob = release.sa_kubeconfig(ns, "alice"), release.sa_kubeconfig(ns, "bob")
    wait_for(lambda: can_i(release, alice, "create", "finetunes.deltafleet.dev", "-n", ns), "edit to aggregate FineTunes")
    wait_for(lambda: can_i(release, bob, "list", "finetunes.deltafleet.dev", "-n", ns), "view to aggregate FineTunes")
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert can_i(release, alice, verb, "finetunes.deltafleet.dev", "-n", ns), verb
    for verb in ("create", "patch", "delete"):
        assert not can_i(release, bob, verb, "finetunes.deltafleet.dev", "-n", ns), verb
    for kc in (alice, bob):
        assert not can_i(release, kc, "patch", "finetunes.deltafleet.dev", "--subresource=status", "-n", ns)
        assert not can_i(release, kc, "get", "finetunes.deltafleet.dev", "-n", OTHER)
