"""The Helm chart, rendered with the real (pinned, cached) helm: lint, schema, RBAC shape.
No cluster needed; tests/k8s/test_k8s_install.py installs it into the real one."""

from __future__ import annotations

import os
import re
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
    # the RayService role, and `helm test`'s (reads the operator's Deployment)
    assert sorted((r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(cluster, "Role")) == [
        ("deltafleet", "df-deltafleet-rayservice"), ("deltafleet", "df-deltafleet-test")]
    namespaced = template(helm, *NAMESPACED, "userRoles.create=false")
    assert not by_kind(namespaced, "ClusterRole") and not by_kind(namespaced, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(namespaced, "Role")}
    assert roles == {("team-a", "df-deltafleet"), ("team-b", "df-deltafleet"), ("deltafleet", "df-deltafleet-rayservice"),
                     ("deltafleet", "df-deltafleet-test")}
    for doc in by_kind(cluster, "ClusterRole") + by_kind(namespaced, "Role"):
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            if "secrets" in rule["resources"]:  # API keys: the Secret a FineTune names, never all of them
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"]
    ray = [r for r in by_kind(namespaced, "Role") if r["metadata"]["name"].endswith("rayservice")][0]
    # Its one RayService; and its RayClusters' worker bounds (their names are KubeRay's), nothing else.
    assert ray["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayservices"], "resourceNames": ["deltafleet"], "verbs": ["get", "patch"]},
                            {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "patch"]}]
    assert not [r for r in by_kind(template(helm, "serve.backend=ray-api", "tests.enabled=false"), "Role")]
    open_pools = template(helm, "serve.auth=none")
    assert not [r for d in by_kind(open_pools, "ClusterRole") for r in d["rules"] if "secrets" in r["resources"]]


@pytest.mark.parametrize(
    "sets, message",
    [
        # Helm 4's JSON-schema messages: the field as a JSON pointer, then what is wrong
        (("surprise=1",), "additional properties 'surprise' not allowed"),
        (("serve.backend=grpc",), "at '/serve/backend': value must be one of 'rayservice', 'ray-api'"),
        (("serve.prefixCaching=maybe",), "at '/serve/prefixCaching': got string, want boolean"),
        (("serve.placement=somewhere",), "at '/serve/placement': value must be one of 'routed', 'all'"),
        (("watch.allNamespaces=false",), "at '/watch/namespaces': minItems: got 0, want 1"),
        (("modelStore.claimName=a", "modelStore.hostPath=/b"), "modelStore: set one of claimName or hostPath, not both"),
    ],
)
def test_bad_values_are_refused(helm, sets, message):
    out = helm("template", "df", str(CHART), *[a for s in sets for a in ("--set", s)], check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_helm_test_hook_uses_the_operator_account(helm):
    (pod,) = [d for d in template(helm) if d["kind"] == "Pod" and d["metadata"]["name"] == "df-deltafleet-test-access"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == "df-deltafleet"
    assert pod["spec"]["containers"][0]["command"][:2] == ["python", "-c"]
    assert not [d for d in template(helm, "tests.enabled=false") if d["kind"] == "Pod"]


def test_the_operator_understands_the_chart_settings(helm):
    """The Deployment's env is the operator's configuration: every variable is one it reads,
    and the values arrive as the settings they mean."""
    from deltafleet.operator.settings import build_parser, parse_settings

    read = set(re.findall(r"DELTAFLEET_[A-Z_]+", build_parser({}).format_help()))  # its --help
    sets = (*NAMESPACED, "modelStore.hostPath=/srv/models", "compression.image.tag=9.9", "serve.backend=ray-api",
            "serve.rayApi.dashboardUrl=http://ray-head:8265", "compression.runAsUser=4242", "serve.auth=none",
            "policy.allowHostPath=true", "policy.allowedImages={reg/a:1,reg/b:2}", "policy.maxGpus=2",
            "policy.maxMemory=64Gi", "policy.maxDeadlineSeconds=3600", "serve.prefixCaching=false",
            "policy.maxReplicasPerPool=16", "policy.maxGpusPerReplica=2", "serve.placement=all",
            "serve.maxTenantsPerReplica=48")
    container = by_kind(template(helm, *sets), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in env:
        if name.startswith("DELTAFLEET_"):
            assert name in read, f"the chart sets {name}, which `deltafleet operator` never reads"
    settings, _ = parse_settings(container.get("args", []), environ=env)
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.backend == "ray-api" and settings.ray_dashboard_url == "http://ray-head:8265"
    assert settings.store_host_path == "/srv/models" and settings.store_claim == ""
    assert settings.job_image == "ghcr.io/deltafleet/deltafleet-ml:9.9" and settings.job_run_as_user == 4242
    assert settings.liveness_port == container["ports"][0]["containerPort"]
    assert settings.serve_auth == "none"
    assert (settings.policy_host_path, settings.policy_allowed_images, settings.policy_max_gpus) == ("allow", "reg/a:1,reg/b:2", 2)
    assert (settings.policy_max_memory, settings.policy_max_deadline_seconds) == ("64Gi", 3600)
    assert (settings.policy_max_replicas, settings.policy_max_gpus_per_replica) == (16, 2.0)
    assert settings.serve_prefix_caching == "off"
    assert (settings.serve_placement, settings.serve_max_tenants_per_replica) == ("all", 48)
    defaults, _ = parse_settings([], environ={e["name"]: e["value"] for e in by_kind(template(helm), "Deployment")[0]
                                              ["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e})
    assert (defaults.serve_auth, defaults.policy_host_path, defaults.policy_max_gpus) == ("keys", "deny", 8)
    assert (defaults.policy_max_replicas, defaults.policy_max_gpus_per_replica) == (8, 1.0)
    assert defaults.serve_prefix_caching == "on"
    assert (defaults.serve_placement, defaults.serve_max_tenants_per_replica) == ("routed", 0)


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
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    labelled = by_kind(template(helm, "metrics.serviceMonitor.enabled=true",
                                "metrics.serviceMonitor.labels.release=kube-prometheus-stack"), "ServiceMonitor")[0]
    assert labelled["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # what a default Prometheus selects


def test_the_metrics_service_selects_the_operator_and_not_the_pools_ray_pods(helm):
    docs = template(helm, "pool.create=true", "modelStore.claimName=models")
    svc = [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics")][0]
    selector = svc["spec"]["selector"].items()
    assert selector <= by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"].items()
    cluster = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    for pod in (cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])):
        assert not selector <= pod["metadata"]["labels"].items(), "Prometheus would scrape a Ray pod as the operator"


def test_two_replicas_share_a_kopf_peering_object_with_least_privilege_rbac_and_a_pdb(helm):
    from kopf._cogs.structs import references

    from deltafleet.operator.settings import parse_settings

    def env(deployment):
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}

    one = template(helm)
    deployment = by_kind(one, "Deployment")[0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "DELTAFLEET_PEERING" not in env(deployment) and "POD_ID" not in env(deployment)
    assert not by_kind(one, "PodDisruptionBudget") and not [d for d in one if d["apiVersion"].startswith("kopf.dev/")]

    two = template(helm, "operator.replicas=2")
    deployment = by_kind(two, "Deployment")[0]
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["minReadySeconds"] == 10
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    values = env(deployment)
    assert values["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's name for the replica
    settings, _ = parse_settings([], environ={k: v for k, v in values.items() if isinstance(v, str)})
    assert (settings.peering, settings.peering_lifetime) == ("df-deltafleet", 10)
    (peering,) = by_kind(two, "ClusterKopfPeering")
    assert peering["apiVersion"] == "{0.group}/{0.version}".format(references.CLUSTER_PEERINGS_K) and peering["metadata"]["name"] == "df-deltafleet"
    role = [r for r in by_kind(two, "ClusterRole") if r["metadata"]["name"] == "df-deltafleet-peering"][0]
    assert role["rules"] == [
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["list", "watch"]},
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "resourceNames": ["df-deltafleet"], "verbs": ["patch"]},
    ]
    binding = [b for b in by_kind(two, "ClusterRoleBinding") if b["roleRef"]["name"] == "df-deltafleet-peering"][0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "df-deltafleet", "namespace": "deltafleet"}]
    (pdb,) = by_kind(two, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert not by_kind(template(helm, "operator.replicas=2", "operator.podDisruptionBudget.enabled=false"), "PodDisruptionBudget")

    namespaced = template(helm, "operator.replicas=2", *NAMESPACED)
    assert sorted(p["metadata"]["namespace"] for p in by_kind(namespaced, "KopfPeering")) == ["team-a", "team-b"]
    assert {p["apiVersion"] for p in by_kind(namespaced, "KopfPeering")} == {"{0.group}/{0.version}".format(references.NAMESPACED_PEERINGS_K)}
    roles = [r for r in by_kind(namespaced, "Role") if r["metadata"]["name"] == "df-deltafleet-peering"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert roles[0]["rules"][1] == {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "resourceNames": ["df-deltafleet"], "verbs": ["patch"]}
    assert not by_kind(namespaced, "ClusterKopfPeering")
    assert not [r for r in by_kind(namespaced, "ClusterRole") if "peering" in r["metadata"]["name"]]

    # the standard kinds of the HA rendering pass the Kubernetes schemas (kopf's kinds have none there)
    standard = "\n---\n".join(yaml.safe_dump(d) for d in two if not d["apiVersion"].startswith("kopf.dev/"))
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, "-"],
                         input=standard, capture_output=True, text=True)
    assert out.returncode == 0 and "WARN" not in out.stdout, out.stdout + out.stderr


def test_the_peering_crds_are_the_ones_kopf_looks_for():
    from kopf._cogs.structs import references

    crds = {d["metadata"]["name"]: d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d}
    for selector, scope in ((references.CLUSTER_PEERINGS_K, "Cluster"), (references.NAMESPACED_PEERINGS_K, "Namespaced")):
        crd = crds[f"{selector.any_name}.{selector.group}"]
        assert crd["spec"]["scope"] == scope and crd["spec"]["names"]["plural"] == selector.any_name
        (version,) = crd["spec"]["versions"]
        assert version["name"] == selector.version and version["served"] and version["storage"]
        # kopf patches keep-alives into .status of the object itself: no status subresource, status kept whole
        assert "subresources" not in version
        assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True


@pytest.mark.parametrize("sets, message", [
    (("operator.replicas=0",), "at '/operator/replicas': minimum"),
    (("operator.peering.lifetime=2",), "at '/operator/peering/lifetime': minimum"),
])
def test_bad_ha_values_are_refused(helm, sets, message):
    out = helm("template", "df", str(CHART), *[a for s in sets for a in ("--set", s)], check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_helm_test_waits_for_the_operators_deployment_with_an_account_that_can_only_read_it(helm):
    docs = template(helm, "tests.operatorReadyTimeoutSeconds=45")
    (pod,) = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "df-deltafleet-test-operator-ready"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == "df-deltafleet-test"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["OPERATOR_DEPLOYMENT"] == by_kind(docs, "Deployment")[0]["metadata"]["name"] and env["TIMEOUT_SECONDS"] == "45"
    assert pod["spec"]["activeDeadlineSeconds"] > 45
    role = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "df-deltafleet-test"][0]
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["df-deltafleet"], "verbs": ["get"]}]
    binding = [b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["name"] == "df-deltafleet-test"][0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "df-deltafleet-test", "namespace": "deltafleet"}]
    assert not [d for d in template(helm, "tests.enabled=false") if d["metadata"]["name"].startswith("df-deltafleet-test")]


def test_the_image_pull_secrets_reach_compression_jobs_too(helm):
    """Before, imagePullSecrets reached the operator and the pool but not compression Jobs:
    every Job ended ErrImagePull on a private registry."""
    from deltafleet.operator.settings import parse_settings

    docs = template(helm, "imagePullSecrets[0].name=regcred", "imagePullSecrets[1].name=mirror")
    deployment = by_kind(docs, "Deployment")[0]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DELTAFLEET_JOB_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    settings, _ = parse_settings([], {"DELTAFLEET_JOB_IMAGE_PULL_SECRETS": env["DELTAFLEET_JOB_IMAGE_PULL_SECRETS"]})
    assert settings.job_image_pull_secrets == "regcred,mirror"
    plain = by_kind(template(helm), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "DELTAFLEET_JOB_IMAGE_PULL_SECRETS" not in {e["name"] for e in plain}
