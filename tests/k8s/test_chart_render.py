"""The Helm chart, rendered with the real (pinned, cached) helm: lint, schema, RBAC shape.
No cluster needed; tests/k8s/test_k8s_install.py installs it into the real one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.binaries import kube_minor_schema, require_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "deltafleet"
KUBE_VERSION = kube_minor_schema()  # the test cluster's minor (tests/cluster/tools/k8s/go.mod)


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    binary = require_binaries() / "helm"
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env)
        if check and out.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out

    return run


def template(helm, *sets: str, namespace: str = "deltafleet") -> list[dict]:
    args = ["template", "df", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


NAMESPACED = ("watch.allNamespaces=false", "watch.namespaces={team-a,team-b}")


@pytest.mark.parametrize("sets", [(), NAMESPACED, ("serve.backend=ray-api", "modelStore.hostPath=/srv/models")])
def test_lint_strict(helm, sets):
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("sets", [(), NAMESPACED, ("serve.backend=ray-api", "serve.rayApi.authTokenSecret.name=ray-token")])
def test_rendered_manifests_validate_against_kubernetes_schemas(helm, sets):
    rendered = helm("template", "df", str(CHART), "-n", "deltafleet", "--kube-version", KUBE_VERSION,
                    *[a for s in sets for a in ("--set", s)]).stdout
    out = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, "-"],
        input=rendered, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARN" not in out.stdout, f"a manifest was not checked against a schema:\n{out.stdout}"
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
    assert out.stdout.count("passed for resource") == len([d for d in yaml.safe_load_all(rendered) if d]) and kinds


def test_chart_crd_is_the_generated_one_with_keep(helm):
    crd = by_kind(template(helm), "CustomResourceDefinition")[0]
    generated = yaml.safe_load((ROOT / "crds/finetunes.deltafleet.dev.yaml").read_text())
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert "annotations" not in by_kind(template(helm, "crds.keep=false"), "CustomResourceDefinition")[0]["metadata"]
    assert not by_kind(template(helm, "crds.enabled=false"), "CustomResourceDefinition")


def test_deployment_is_hardened_and_probed(helm):
    deployment = by_kind(template(helm), "Deployment")[0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["deltafleet", "operator"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["limits"]["memory"]
    sa = by_kind(template(helm), "ServiceAccount")[0]
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is True
    for d in template(helm):
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "deltafleet" and labels["app.kubernetes.io/instance"] == "df", d["kind"]


def test_operator_settings_follow_values(helm):
    def env(*sets):
        c = by_kind(template(helm, *sets), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in c["env"]}

    default = env()
    assert default["DELTAFLEET_NAMESPACES"] == "" and default["DELTAFLEET_SERVE_BACKEND"] == "rayservice"
    assert default["DELTAFLEET_RAYSERVICE_NAMESPACE"] == "deltafleet"
    api = env("serve.backend=ray-api", "serve.rayApi.dashboardUrl=http://ray:8265", *NAMESPACED)
    assert api["DELTAFLEET_RAY_DASHBOARD_URL"] == "http://ray:8265" and "DELTAFLEET_RAYSERVICE_NAME" not in api
    assert api["DELTAFLEET_NAMESPACES"] == "team-a,team-b"
    store = by_kind(template(helm, "modelStore.claimName=models"), "Deployment")[0]["spec"]["template"]["spec"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "models"}} in store["volumes"]
    assert {"name": "model-store", "mountPath": "/models"} in store["containers"][0]["volumeMounts"]


def test_rbac_cluster_wide_vs_per_namespace(helm):
    cluster = template(helm)
    # the operator's, plus the two aggregated into the built-in edit/admin and view roles
    assert [r["metadata"]["name"] for r in by_kind(cluster, "ClusterRole")] == [
        "df-deltafleet", "df-deltafleet-finetune-editor", "df-deltafleet-finetune-viewer"]
    users = {r["metadata"]["name"]: r for r in by_kind(cluster, "ClusterRole") if "finetune-" in r["metadata"]["name"]}
    assert users["df-deltafleet-finetune-editor"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert users["df-deltafleet-finetune-viewer"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert not [r for d in users.values() for r in d["rules"] if "finetunes/status" in r["resources"] and set(r["verbs"]) - {"get", "list", "watch"}]
    assert [r["metadata"]["namespace"] for r in by_kind(cluster, "Role")] == ["deltafleet"]  # the RayService role
    namespaced = template(helm, *NAMESPACED, "userRoles.create=false")
    assert not by_kind(namespaced, "ClusterRole") and not by_kind(namespaced, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(namespaced, "Role")}
    assert roles == {("team-a", "df-deltafleet"), ("team-b", "df-deltafleet"), ("deltafleet", "df-deltafleet-rayservice")}
    for doc in by_kind(cluster, "ClusterRole") + by_kind(namespaced, "Role"):
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            if "secrets" in rule["resources"]:  # API keys: the Secret a FineTune names, never all of them
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"]
    ray = [r for r in by_kind(namespaced, "Role") if r["metadata"]["name"].endswith("rayservice")][0]
    assert ray["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayservices"], "resourceNames": ["deltafleet"], "verbs": ["get", "patch"]}]
    assert not [r for r in by_kind(template(helm, "serve.backend=ray-api"), "Role")]
    open_pools = template(helm, "serve.auth=none")
    assert not [r for d in by_kind(open_pools, "ClusterRole") for r in d["rules"] if "secrets" in r["resources"]]


@pytest.mark.parametrize(
    "sets, message",
    [
        # Helm 4's JSON-schema messages: the field as a JSON pointer, then what is wrong
        (("surprise=1",), "additional properties 'surprise' not allowed"),
        (("serve.backend=grpc",), "at '/serve/backend': value must be one of 'rayservice', 'ray-api'"),
        (("watch.allNamespaces=false",), "at '/watch/namespaces': minItems: got 0, want 1"),
        (("modelStore.claimName=a", "modelStore.hostPath=/b"), "modelStore: set one of claimName or hostPath, not both"),
    ],
)
def test_bad_values_are_refused(helm, sets, message):
    out = helm("template", "df", str(CHART), *[a for s in sets for a in ("--set", s)], check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_helm_test_hook_uses_the_operator_account(helm):
    (pod,) = [d for d in template(helm) if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == "df-deltafleet"
    assert pod["spec"]["containers"][0]["command"][:2] == ["python", "-c"]
    assert not [d for d in template(helm, "tests.enabled=false") if d["kind"] == "Pod"]


def test_the_operator_understands_the_chart_settings(helm):
    """The Deployment's env is the operator's configuration: every variable is one it reads,
    and the values arrive as the settings they mean."""
    from deltafleet.operator.settings import parse_settings

    source = (ROOT / "operator" / "settings.py").read_text()
    sets = (*NAMESPACED, "modelStore.hostPath=/srv/models", "compression.image.tag=9.9", "serve.backend=ray-api",
            "serve.rayApi.dashboardUrl=http://ray-head:8265", "compression.runAsUser=4242", "serve.auth=none",
            "policy.allowHostPath=true", "policy.allowedImages={reg/a:1,reg/b:2}", "policy.maxGpus=2",
            "policy.maxMemory=64Gi", "policy.maxDeadlineSeconds=3600")
    container = by_kind(template(helm, *sets), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in env:
        if name.startswith("DELTAFLEET_"):
            assert f'"{name}"' in source, f"the chart sets {name}, which `deltafleet operator` never reads"
    settings, _ = parse_settings(container.get("args", []), environ=env)
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.backend == "ray-api" and settings.ray_dashboard_url == "http://ray-head:8265"
    assert settings.store_host_path == "/srv/models" and settings.store_claim == ""
    assert settings.job_image == "ghcr.io/deltafleet/deltafleet-ml:9.9" and settings.job_run_as_user == 4242
    assert settings.liveness_port == container["ports"][0]["containerPort"]
    assert settings.serve_auth == "none"
    assert (settings.policy_host_path, settings.policy_allowed_images, settings.policy_max_gpus) == ("allow", "reg/a:1,reg/b:2", 2)
    assert (settings.policy_max_memory, settings.policy_max_deadline_seconds) == ("64Gi", 3600)
    defaults, _ = parse_settings([], environ={e["name"]: e["value"] for e in by_kind(template(helm), "Deployment")[0]
                                              ["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e})
    assert (defaults.serve_auth, defaults.policy_host_path, defaults.policy_max_gpus) == ("keys", "deny", 8)


def test_ray_auth_token_comes_from_a_mounted_secret(helm):
    """Ray token authentication: the Secret is mounted read-only (the operator's only RBAC on
    Secrets is API keys' get) and its file handed to the operator; nothing is mounted when no Secret is named."""
    from deltafleet.operator.settings import parse_settings

    sets = ("serve.backend=ray-api", "serve.rayApi.authTokenSecret.name=ray-token")
    docs = template(helm, *sets)
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings, _ = parse_settings([], environ=env)
    assert settings.ray_auth_token_file == "/var/run/secrets/ray/auth_token"
    mount = [m for m in container["volumeMounts"] if m["name"] == "ray-auth-token"][0]
    assert mount == {"name": "ray-auth-token", "mountPath": "/var/run/secrets/ray", "readOnly": True}
    volume = [v for v in pod["volumes"] if v["name"] == "ray-auth-token"][0]
    assert volume["secret"]["secretName"] == "ray-token"
    # the token is mounted, not read through the API: the only Secret rule is API keys' get
    assert [r["verbs"] for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"] if "secrets" in r["resources"]] == [["get"]]
    plain = by_kind(template(helm, "serve.backend=ray-api"), "Deployment")[0]["spec"]["template"]["spec"]
    assert "ray-auth-token" not in {v["name"] for v in plain["volumes"]}
    assert "DELTAFLEET_RAY_AUTH_TOKEN_FILE" not in {e["name"] for e in plain["containers"][0]["env"]}


def test_the_operators_metrics_have_a_service_and_an_optional_service_monitor(helm):
    docs = template(helm)
    svc = [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics")][0]
    deployment = by_kind(docs, "Deployment")[0]
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics" and ports["metrics"] == 8081
    assert not by_kind(docs, "ServiceMonitor")
    monitor = by_kind(template(helm, "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")[0]
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]
