"""docs/deploy.md, replayed on a real node with the real KubeRay: its blocks marked
`<!-- replay -->` run, in order, with the real kubectl and helm; `<!-- replay: file NAME -->`
blocks are the files those commands read. The operator runs from its image, the compression
Job and the Ray pods from the ML image, under the kubelet; KubeRay (installed as its chart
would) runs the pool; then the page's "Call it" step: `kubectl port-forward` to the serve
Service and the `openai` client, whose greedy text must be what `deltafleet merge`'s model
generates. What a CPU-only test node cannot have is swapped, each swap said where it is made:
the NFS source becomes a hostPath over a local store holding the toy models, the pool gets CPU
workers and small requests (cpu-pool.yaml), the example's Job asks for less CPU, and the images
are named by the digests built here.

The same install then goes on (module-scoped, in file order): a second FineTune joins the
pool's RayCluster, keys are rotated and revoked, `helm upgrade` with no Ray change keeps the
RayCluster, a deleted and recreated RayService is re-applied, a deleted FineTune's model
answers 404, and an operator killed mid-way converges."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.binaries import require_binaries
from ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy.md"
KUBERAY_CRD = ROOT / "tests" / "operator" / "kuberay-crd.sh"
NFS = "nfs: {server: nfs.example.internal, path: /exports/models}"
BLOCK = re.compile(r"<!-- replay(?:: file (?P<file>[\w.-]+))? -->\n```\w*\n(?P<body>.*?)```", re.S)


def replay_blocks(text: str) -> list[tuple[str | None, str]]:
    """[(file name or None for commands, body)], in the page's order."""
    return [(m.group("file"), m.group("body")) for m in BLOCK.finditer(text)]


def commands(body: str) -> list[str]:
    """One command per line; `\\` continues a line; comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_page_has_the_blocks_the_replay_needs():
    blocks = replay_blocks(DOC.read_text())
    assert [f for f, _ in blocks if f] == ["fleet-values.yaml"]
    lines = [c for f, body in blocks if f is None for c in commands(body)]
    assert any(c.startswith("helm install deltafleet") for c in lines)
    assert any(c.startswith("kubectl apply -f examples/") for c in lines)
    assert NFS in dict((f, b) for f, b in blocks if f)["fleet-values.yaml"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The store examples/finetune-store.yaml expects, set up as the page says (group 1000, setgid)."""
    from deltafleet.toymodels import toy_eval_text, toy_pair

    base, ft = toy_pair("llama")
    root = tmp_path_factory.mktemp("store") / "exports" / "models"
    shutil.copytree(base, root / "bases" / "tiny-llama")
    shutil.copytree(ft, root / "finetunes" / "tiny-llama-code")
    (root / "data").mkdir()
    text = toy_eval_text("llama").read_text()
    (root / "data" / "code.txt").write_text(text[:text.index("\n", 6000) + 1])
    (root / "deltas").mkdir()
    for p in [root, *root.rglob("*")]:  # sudo chgrp -R 1000; chmod -R g+rwX; dirs g+s
        os.chown(p, 0, 1000)
        p.chmod(0o2775 if p.is_dir() else 0o664)
    return root




# What a CPU-only node can run: head and one CPU worker with small requests (KubeRay gives the
# worker num-cpus from its CPU limit: one serving replica), a small batch. Added to the page's
# `helm install` as a second values file.
CPU_POOL = {
    "pool": {
        "head": {"resources": {"requests": {"cpu": "100m", "memory": "1536Mi"}, "limits": {"memory": "3Gi"}}},
        "workers": {"gpus": 0, "acceleratorType": "", "minReplicas": 1, "maxReplicas": 1, "shmSize": "512Mi",
                    "resources": {"requests": {"cpu": "100m", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "5Gi"}}},
    },
    "serve": {"maxBatchSize": 4},
}
# The example's Job asks for 2 CPUs, all this node has: it gets what the toy model needs.
JOB_REQUESTS = ('requests: {cpu: "2", memory: 4Gi}', "requests: {cpu: 500m, memory: 2Gi}")
KEY = "sk-code-helper-0123456789abcdef"
PROMPT = "def main(argv):\n    "


class Install:
    """The replayed install: the cluster, the commands' environment and what they printed."""

    def __init__(self, k8s, store: Path, work: Path, env: dict):
        self.k8s, self.store, self.work, self.env = k8s, store, work, env
        self.transcript: list[str] = []
        self.port_forward: subprocess.Popen | None = None
        self.port = 0

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(["bash", "-c", command], cwd=self.work, env=self.env, capture_output=True, text=True,
                             timeout=1200)
        self.transcript.append(f"$ {command}\n{out.stdout}{out.stderr}")
        if check and out.returncode != 0:
            pytest.fail(f"`{command}` exited {out.returncode}\n" + "\n".join(self.transcript[-3:]) + self.diagnosis())
        return out

    def diagnosis(self) -> str:
        k = self.k8s
        parts = [k.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout,
                 k.kubectl("-n", "deltafleet", "logs", "deployment/deltafleet", "--tail=40", check=False).stdout,
                 k.kubectl("-n", "deltafleet", "get", "rayservice", "deltafleet", "-o", "jsonpath={.status}",
                           check=False).stdout[-3000:],
                 k.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]]
        return "\n--- cluster ---\n" + "\n---\n".join(parts)

    def rayclusters(self) -> list[str]:
        return self.k8s.kubectl("-n", "deltafleet", "get", "raycluster", "-o", "name").stdout.split()

    def condition(self, name: str, kind: str, namespace: str = "team-a") -> dict:
        ft = json.loads(self.k8s.kubectl("-n", namespace, "get", "ft", name, "-o", "json").stdout)
        return next((c for c in ft.get("status", {}).get("conditions", []) if c["type"] == kind), {})

    def wait_ready(self, name: str, timeout_s: float = 900, namespace: str = "team-a") -> None:
        try:
            self.k8s.wait_for(lambda: self.condition(name, "Ready", namespace).get("status") == "True",
                              f"FineTune {namespace}/{name} Ready", timeout_s, interval_s=2)
        except TimeoutError as e:
            pytest.fail(f"{e}: Ready is {self.condition(name, 'Ready', namespace)}" + self.diagnosis())

    def forward(self) -> str:
        """The page's `kubectl port-forward` to the serve Service (again after the pod behind
        it changed); the base URL the openai client uses."""
        if self.port_forward is not None and self.port_forward.poll() is None:
            return f"http://127.0.0.1:{self.port}"
        self.port = free_port()
        self.port_forward = subprocess.Popen(
            ["kubectl", "-n", "deltafleet", "port-forward", "svc/deltafleet-serve-svc", f"{self.port}:8000"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.port_forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8000"
        assert "Forwarding from" in line, line + (self.port_forward.stdout.read() if self.port_forward.poll() else "")
        return f"http://127.0.0.1:{self.port}"

    def complete(self, model: str, key: str, max_tokens: int = 16):
        from openai import OpenAI

        for attempt in range(3):  # a port-forward to a pod that went away ends: start another
            client = OpenAI(base_url=f"{self.forward()}/tiny-llama/v1", api_key=key, max_retries=0, timeout=120)
            try:
                return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
            except Exception as e:
                if type(e).__name__ != "APIConnectionError" or attempt == 2:
                    raise
                self.stop_forward()

    def stop_forward(self) -> None:
        if self.port_forward is not None:
            self.port_forward.kill()
            self.port_forward.wait()
            self.port_forward = None


@pytest.fixture(scope="module")
def install(k8s, operator_image, ml_image, store, tmp_path_factory):
    k8s.node.import_images()  # the images this session built, if the node started before them
    # Prerequisite the page installs with KubeRay's chart: here its operator from the pinned
    # module, its CRDs and RBAC, the same way (tests/cluster/node.py kuberay_manifests).
    k8s.install_kuberay(watch=("deltafleet",))
    work = tmp_path_factory.mktemp("work")
    (work / "charts").symlink_to(ROOT / "charts")
    (work / "examples").mkdir()
    for f in (ROOT / "examples").iterdir():
        text = f.read_text()
        (work / "examples" / f.name).write_text(text.replace(*JOB_REQUESTS) if f.name == "finetune-store.yaml" else text)
    assert JOB_REQUESTS[0] in (ROOT / "examples" / "finetune-store.yaml").read_text()
    (work / "cpu-pool.yaml").write_text(yaml.safe_dump(CPU_POOL))
    test_flags = [  # the images built here, by digest; a short resync so the replay does not wait minutes
        "-f", "cpu-pool.yaml",
        "--set", f"image.digest={operator_image['digest']}", "--set", f"compression.image.digest={ml_image['digest']}",
        "--set", "'operator.extraArgs={--resync-seconds=2}'",
    ]
    helm_home = tmp_path_factory.mktemp("helm")
    env = {**os.environ, "PATH": f"{require_binaries()}:{os.environ['PATH']}", "KUBECONFIG": str(k8s.kubeconfig),
           **{f"HELM_{k}_HOME": str(helm_home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    inst = Install(k8s, store, work, env)
    inst.helm_flags = " ".join(test_flags)
    for name, body in replay_blocks(DOC.read_text()):
        if name:
            assert NFS in body
            (work / name).write_text(body.replace(NFS, f"hostPath: {{path: {store}}}"))
            continue
        for command in commands(body):
            inst.sh(command + " " + inst.helm_flags if command.startswith("helm install ") else command)
    yield inst
    inst.stop_forward()
    # The operator first (a running operator puts back a finalizer taken away).
    k8s.kubectl("-n", "deltafleet", "delete", "deployment", "deltafleet", "--wait=true", "--timeout=120s", check=False)
    k8s.helm("uninstall", "deltafleet", "-n", "deltafleet", check=False)
    for ns in ("team-a", "deltafleet"):
        for name in k8s.kubectl("-n", ns, "get", "ft", "-o", "name", check=False).stdout.split():
            k8s.kubectl("-n", ns, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
        k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    k8s.kubectl("delete", "pv", "-l", "app.kubernetes.io/instance=deltafleet", "--wait=false", check=False)


def merged_greedy(store: Path, delta: Path, out: Path, max_tokens: int = 16) -> str:
    """What `deltafleet merge`'s checkpoint generates greedily for PROMPT (transformers, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    subprocess.run([sys.executable, "-m", "deltafleet", "merge", "--base", str(store / "bases" / "tiny-llama"),
                    "--delta", str(delta), "--out", str(out), "--dtype", "float32"], check=True, capture_output=True)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
    new = gen[0, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    return tok.decode(new[: new.index(eos)] if eos in new else new)


def test_the_page_compresses_the_finetune_into_the_pool(install):
    # The page's last command printed the pool's serveConfigV2: the tenant is in it, under its
    # key's digest, pointing at the delta the Job wrote into the shared store.
    config = yaml.safe_load(install.transcript[-1].split("\n", 1)[1])
    (app,) = config["applications"]
    tenants = app["deployments"][0]["user_config"]["tenants"]
    assert set(tenants) == {"code-helper"}
    assert tenants["code-helper"]["uri"] == "file:///models/deltas/team-a/code-helper/g1/delta.safetensors"
    assert (install.store / "deltas" / "team-a" / "code-helper" / "g1" / "delta.safetensors").is_file()
    assert app["args"]["base_model"] == "/models/bases/tiny-llama"
    ft = json.loads(install.k8s.kubectl("-n", "team-a", "get", "ft", "code-helper", "-o", "json").stdout)
    assert ft["status"]["delta"]["fidelity"]["retainedImprovement"] > 0


def test_the_openai_client_gets_the_merged_models_text_through_the_serve_service(install, tmp_path):
    install.wait_ready("code-helper")
    assert len(install.rayclusters()) == 1
    reply = install.complete("code-helper", KEY)
    delta = install.store / "deltas" / "team-a" / "code-helper" / "g1" / "delta.safetensors"
    assert reply.choices[0].text == merged_greedy(install.store, delta, tmp_path / "merged")


def status_of(call) -> int:
    """The HTTP status an openai call ends with (200 when it returns)."""
    try:
        call()
        return 200
    except Exception as e:
        if not hasattr(e, "status_code"):
            raise
        return e.status_code


SECOND = """apiVersion: deltafleet.dev/v1alpha1
kind: FineTune
metadata: {name: %(name)s, namespace: team-a}
spec:
  baseModel: {path: bases/tiny-llama}
  fineTunedModel: {path: finetunes/tiny-llama-code}
  modelStore: {claimName: models}
  compression: {gpus: 0, steps: 4, calibration: {samples: 16}, resources: {requests: {cpu: 500m, memory: 2Gi}}}
  serving: {pool: tiny-llama, modelName: %(name)s, gpusPerReplica: 0, apiKeySecretRef: {name: %(name)s-keys}}
"""


def test_a_second_finetune_joins_the_same_raycluster(install):
    k8s, before = install.k8s, install.rayclusters()
    k8s.kubectl("-n", "team-a", "create", "secret", "generic", "second-keys", "--from-literal=dev=sk-second-0123456789abcdef")
    k8s.kubectl("apply", "-f", "-", input=SECOND % {"name": "second"})
    install.wait_ready("second")
    assert install.complete("second", "sk-second-0123456789abcdef").choices[0].text
    assert install.rayclusters() == before, "a new tenant is a serve-config change, never a new RayCluster"
    # Each key reaches only its own FineTune's model: another's answers as if it did not exist.
    assert status_of(lambda: install.complete("second", KEY)) == 404


def test_a_rotated_key_works_and_the_revoked_one_stops_on_the_serving_cluster(install):
    k8s, new = install.k8s, "sk-code-helper-rotated-9876543210"
    patch = json.dumps({"stringData": {"dev": new}})
    k8s.kubectl("-n", "team-a", "patch", "secret", "code-helper-keys", "--type=merge", "-p", patch)
    k8s.wait_for(lambda: status_of(lambda: install.complete("code-helper", new, max_tokens=1)) == 200,
                 "the rotated key to be accepted", 180, interval_s=2)
    assert status_of(lambda: install.complete("code-helper", KEY, max_tokens=1)) == 401


def test_helm_upgrade_without_a_ray_change_keeps_the_raycluster_and_the_tenants(install):
    before = install.rayclusters()
    # An operator setting (what a chart version bump changes too) and the workers' bounds, which
    # KubeRay leaves out of its cluster hash: no new RayCluster, and the operator carries the
    # new maxReplicas over to the one there is (KubeRay itself does not).
    install.sh("helm upgrade deltafleet charts/deltafleet -n deltafleet -f fleet-values.yaml " + install.helm_flags
               + " --set operator.logLevel=debug --set pool.workers.maxReplicas=2")
    install.sh("kubectl -n deltafleet rollout status deployment/deltafleet --timeout=180s")
    time.sleep(10)  # KubeRay reconciles within seconds: a new cluster would have been created by now
    assert install.rayclusters() == before

    def max_replicas() -> str:
        return install.k8s.kubectl("-n", "deltafleet", "get", before[0], "-o",
                                   "jsonpath={.spec.workerGroupSpecs[0].maxReplicas}").stdout
    install.k8s.wait_for(lambda: max_replicas() == "2", "the RayCluster's workers maxReplicas 2", 60, interval_s=2)
    install.wait_ready("code-helper", timeout_s=120)
    assert install.complete("second", "sk-second-0123456789abcdef").choices[0].text


def test_helm_upgrade_with_a_ray_change_keeps_tenants_ready_until_the_switch(install):
    """While KubeRay prepares the new cluster the old one serves and every tenant stays Ready,
    its Served condition saying the upgrade is in progress. At the switch KubeRay points the
    serve Service at the new cluster before its workers pass their readiness probe, so the
    Service may have no endpoints for a few seconds (KubeRay's own Ready=False,
    "ZeroServeEndpoints"); the tenants say so too, then are Ready again on the new cluster
    (docs/deploy.md, Upgrade)."""
    k8s, (before,) = install.k8s, install.rayclusters()
    before = before.split("/")[-1]
    # A pod setting of the pool (what a new ML image does too): KubeRay's hash of the cluster
    # changes, so it prepares a second RayCluster and switches the serve Service when ready.
    install.sh("helm upgrade deltafleet charts/deltafleet -n deltafleet -f fleet-values.yaml " + install.helm_flags
               + " --set operator.logLevel=debug --set-string pool.head.resources.limits.memory=3200Mi")

    def active() -> str:
        return k8s.kubectl("-n", "deltafleet", "get", "rayservice", "deltafleet", "-o",
                           "jsonpath={.status.activeServiceStatus.rayClusterName}").stdout

    seen_upgrade, switched_at, unready_s, deadline = False, None, 0.0, time.monotonic() + 900
    while time.monotonic() < deadline:
        ready, now = install.condition("code-helper", "Ready"), time.monotonic()
        switched = active() not in ("", before)
        if switched and switched_at is None:
            switched_at = now
        if ready.get("status") != "True":
            assert switched, f"a tenant went unready while the old cluster served: {ready}" + install.diagnosis()
            unready_s = now - switched_at
            assert unready_s < 120, f"unready {unready_s:.0f}s after the switch: {ready}" + install.diagnosis()
        served = install.condition("code-helper", "Served")  # Ready says only "compressed and served"
        seen_upgrade |= "upgrade in progress" in served.get("message", "")
        if switched and ready.get("status") == "True":
            break
        time.sleep(1)
    else:
        pytest.fail("KubeRay never finished the switch to the new RayCluster" + install.diagnosis())
    assert seen_upgrade, "no FineTune's Served condition said the upgrade was in progress"
    print(f"unready after the switch: {unready_s:.0f}s")
    install.stop_forward()  # its pod went away with the old cluster
    assert install.complete("code-helper", "sk-code-helper-rotated-9876543210").choices[0].text


def test_a_recreated_rayservice_gets_the_serve_config_back(install):
    k8s = install.k8s
    live = json.loads(k8s.kubectl("-n", "deltafleet", "get", "rayservice", "deltafleet", "-o", "json").stdout)
    for field in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        live["metadata"].pop(field, None)
    live.pop("status", None)
    live["spec"].pop("serveConfigV2", None)  # as the chart renders it: without the tenants
    k8s.kubectl("-n", "deltafleet", "delete", "rayservice", "deltafleet", "--wait=true", "--timeout=180s")
    k8s.kubectl("create", "-f", "-", input=json.dumps(live))
    install.stop_forward()
    k8s.wait_for(lambda: "code-helper" in k8s.kubectl("-n", "deltafleet", "get", "rayservice", "deltafleet", "-o",
                                                      "jsonpath={.spec.serveConfigV2}").stdout,
                 "the operator to re-apply the serve config", 120, interval_s=2)
    install.wait_ready("code-helper")
    assert install.complete("code-helper", "sk-code-helper-rotated-9876543210").choices[0].text


def test_a_deleted_finetunes_model_answers_404(install):
    install.k8s.kubectl("-n", "team-a", "delete", "ft", "second", "--timeout=180s")
    install.k8s.wait_for(lambda: status_of(lambda: install.complete("second", "sk-second-0123456789abcdef",
                                                                    max_tokens=1)) in (401, 404),
                         "the deleted tenant to leave the pool", 180, interval_s=2)


def test_an_operator_killed_mid_way_converges(install):
    k8s = install.k8s
    k8s.kubectl("-n", "team-a", "create", "secret", "generic", "third-keys", "--from-literal=dev=sk-third-0123456789abcdef")
    k8s.kubectl("apply", "-f", "-", input=SECOND % {"name": "third"})
    # SIGKILL while the Job runs: no goodbye, the new operator picks the FineTune up from its status.
    k8s.wait_for(lambda: k8s.kubectl("-n", "team-a", "get", "jobs", "-o", "name").stdout.count("third") > 0,
                 "the third FineTune's Job", 120, interval_s=1)
    k8s.kubectl("-n", "deltafleet", "delete", "pod", "-l", "app.kubernetes.io/component=operator",
                "--grace-period=0", "--force")
    install.wait_ready("third")
    assert install.complete("third", "sk-third-0123456789abcdef").choices[0].text
