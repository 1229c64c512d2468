"""The pool status key in the chart: a Secret the chart makes (or the admin names), mounted into
the operator and handed over as a file; the chart's own key survives `helm upgrade` (lookup)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.binaries import require_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "deltafleet"
MOUNT = "/var/run/secrets/deltafleet/serve-status"


def _template(tmp_path, *sets: str) -> list[dict]:
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp_path / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    args = [str(require_binaries() / "helm"), "template", "df", str(CHART), "-n", "deltafleet"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _operator(docs: list[dict]) -> tuple[dict, dict]:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "operator")


def test_the_chart_makes_a_status_key_secret_and_mounts_it_as_the_operators_key_file(tmp_path):
    docs = _template(tmp_path)
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "df-deltafleet-serve-status")
    key = base64.b64decode(secret["data"]["status-key"]).decode()
    assert len(key) == 48 and key.isalnum()
    pod, container = _operator(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DELTAFLEET_SERVE_STATUS_KEY_FILE"] == f"{MOUNT}/status-key"
    assert {"name": "serve-status-key", "mountPath": MOUNT, "readOnly": True} in container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "serve-status-key")
    assert volume["secret"] == {"secretName": "df-deltafleet-serve-status", "items": [{"key": "status-key", "path": "status-key"}],
                                "defaultMode": 0o440}


def test_a_named_status_key_secret_is_used_and_none_is_made(tmp_path):
    docs = _template(tmp_path, "serve.statusKey.secretName=pool-status", "serve.statusKey.key=k")
    assert not [d for d in docs if d["kind"] == "Secret"]
    pod, container = _operator(docs)
    assert {"name": "DELTAFLEET_SERVE_STATUS_KEY_FILE", "value": f"{MOUNT}/k"} in container["env"]
    volume = next(v for v in pod["volumes"] if v["name"] == "serve-status-key")
    assert volume["secret"]["secretName"] == "pool-status" and volume["secret"]["items"] == [{"key": "k", "path": "k"}]


@pytest.mark.cluster
def test_the_chart_made_status_key_survives_an_upgrade(k8s, namespace):
    release = "dfkey"
    sets = ["--set", "crds.enabled=false", "--set", "tests.enabled=false", "--set", "userRoles.create=false",
            "--set", "watch.allNamespaces=false", "--set", f"watch.namespaces={{{namespace}}}"]
    k8s.helm("install", release, CHART, "-n", namespace, *sets)
    try:
        def key() -> str:
            return json.loads(k8s.kubectl("-n", namespace, "get", "secret", f"{release}-deltafleet-serve-status", "-o", "json").stdout)["data"]["status-key"]
        first = key()
        k8s.helm("upgrade", release, CHART, "-n", namespace, *sets, "--set", "operator.logLevel=debug")
        assert key() == first
    finally:
        k8s.helm("uninstall", release, "-n", namespace, check=False)
