"""docs/deploy.md, replayed: its blocks marked `<!-- replay -->` run, in order, with the real
kubectl and helm against the test control plane; `<!-- replay: file NAME -->` blocks are the
files those commands read. The operator runs from its image and the compression Job from the
ML image (the pod runner stands in for the nodes). What the test cluster cannot have is
swapped, each swap listed in SWAPS / test_flags: the NFS source becomes a hostPath over a
local store holding the toy models, KubeRay is only its RayService CRD, and the chart gets the
flags that let its pods share one host (free ports, pods run locally, images by digest)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.binaries import require_binaries

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_has_the_blocks_the_replay_needs():
    blocks = replay_blocks(DOC.read_text())
    assert [f for f, _ in blocks if f] == ["fleet-values.yaml"]
    lines = [c for f, body in blocks if f is None for c in commands(body)]
    assert any(c.startswith("helm install deltafleet") for c in lines)
    assert any(c.startswith("kubectl apply -f examples/") for c in lines)
    assert NFS in dict((f, b) for f, b in blocks if f)["fleet-values.yaml"]


@pytest.fixture
def store(tmp_path):
    """The store examples/finetune-store.yaml expects, set up as the page says (group 1000, setgid)."""
    from deltafleet.toymodels import toy_eval_text, toy_pair

    base, ft = toy_pair("llama")
    root = tmp_path / "exports" / "models"
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


@pytest.fixture
def cleanup(k8s):
    yield
    # The operator first (a running operator puts back a finalizer taken away); not `helm
    # uninstall --wait`: the claims stay Terminating while the finished Job's pod holds them.
    k8s.kubectl("-n", "deltafleet", "delete", "deployment", "deltafleet", "--wait=true", "--timeout=120s", check=False)
    k8s.helm("uninstall", "deltafleet", "-n", "deltafleet", check=False)
    for ns in ("team-a", "deltafleet"):
        for name in k8s.kubectl("-n", ns, "get", "ft", "-o", "name", check=False).stdout.split():
            k8s.kubectl("-n", ns, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
        k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    k8s.kubectl("delete", "pv", "-l", "app.kubernetes.io/instance=deltafleet", "--wait=false", check=False)


def test_deploy_md_replays_on_the_test_cluster(k8s, operator_image, ml_image, store, tmp_path, cleanup):
    # Prerequisites the page installs with KubeRay's own chart: here its RayService CRD only.
    crd = subprocess.run(["bash", str(KUBERAY_CRD)], check=True, capture_output=True, text=True).stdout.split()[-1]
    if k8s.kubectl("get", "crd", "rayservices.ray.io", check=False).returncode != 0:
        k8s.kubectl("create", "-f", crd)
    # As KubeRay's chart install returns: the CRD served before anything names a RayService.
    k8s.wait_for(lambda: k8s.kubectl("get", "crd", "rayservices.ray.io", "-o",
                                     "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                                     check=False).stdout.strip() == "True", "the RayService CRD to be established", 60)
    own_crd = k8s.kubectl("get", "crd", "finetunes.deltafleet.dev", check=False).returncode != 0

    work = tmp_path / "work"
    work.mkdir()
    for d in ("charts", "examples"):
        (work / d).symlink_to(ROOT / d)
    test_flags = [  # what lets the chart's pods run on one host, from the images built here
        "--set-string", "podAnnotations.tests\\.deltafleet\\.dev/run-locally=true",
        "--set", f"image.digest={operator_image['digest']}", "--set", f"compression.image.digest={ml_image['digest']}",
        "--set", f"operator.healthPort={free_port()}", "--set", f"metrics.port={free_port()}",
        "--set", f"crds.enabled={str(own_crd).lower()}",
        # The operator sees the store's deletions and results at /models (its claim, bound to
        # the same folder); the resync is short so the replay does not wait minutes.
        "--set", "operator.extraArgs={--resync-seconds=2}",
    ]
    env = {**os.environ, "PATH": f"{require_binaries()}:{os.environ['PATH']}", "KUBECONFIG": str(k8s.kubeconfig),
           **{f"HELM_{k}_HOME": str(tmp_path / "helm" / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    transcript: list[str] = []
    for name, body in replay_blocks(DOC.read_text()):
        if name:
            assert NFS in body
            (work / name).write_text(body.replace(NFS, f"hostPath: {{path: {store}}}"))
            continue
        for command in commands(body):
            argv = command
            if command.startswith("helm install "):
                argv = command + " " + " ".join(f"'{a}'" if "{" in a or "\\" in a else a for a in test_flags)
            out = subprocess.run(["bash", "-c", argv], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
            transcript.append(f"$ {command}\n{out.stdout}{out.stderr}")
            if out.returncode != 0:
                logs = k8s.kubectl("-n", "deltafleet", "logs", "deployment/deltafleet", "--tail=60", check=False).stdout
                pytest.fail(f"docs/deploy.md: `{command}` exited {out.returncode}\n" + "\n".join(transcript[-3:])
                            + f"\n--- operator log ---\n{logs}")

    # The page's last command printed the pool's serveConfigV2: the tenant is in it, under its
    # key's digest, pointing at the delta the Job wrote into the shared store.
    config = yaml.safe_load(transcript[-1].split("\n", 1)[1])
    (app,) = config["applications"]
    tenants = app["deployments"][0]["user_config"]["tenants"]
    assert set(tenants) == {"code-helper"}
    assert tenants["code-helper"]["uri"] == "file:///models/deltas/team-a/code-helper/g1/delta.safetensors"
    assert (store / "deltas" / "team-a" / "code-helper" / "g1" / "delta.safetensors").is_file()
    assert app["args"]["base_model"] == "/models/bases/tiny-llama"
    ft = json.loads(k8s.kubectl("-n", "team-a", "get", "ft", "code-helper", "-o", "json").stdout)
    assert ft["status"]["delta"]["fidelity"]["retainedImprovement"] > 0
