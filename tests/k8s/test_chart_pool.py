"""The chart's serving pool (templates/pool.yaml: a KubeRay RayService) and shared model store
(templates/store.yaml), rendered with the real helm. tests/operator/test_pool_install.py
installs both into the real control plane, against KubeRay's own CRD."""

from __future__ import annotations

import pytest
from k8s.test_chart_render import CHART, by_kind, helm, template  # noqa: F401 -- helm is a fixture

from deltafleet.operator.images import ML_IMAGE, RAY_VERSION

POOL = ("pool.create=true", "modelStore.claimName=models")


def rayservice(docs: list[dict]) -> dict:
    (rs,) = by_kind(docs, "RayService")
    return rs


def pod_specs(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    (worker,) = cluster["workerGroupSpecs"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": worker["template"]["spec"]}


def test_the_pool_is_not_rendered_unless_asked(helm):
    assert by_kind(template(helm), "RayService") == []


def test_the_pool_is_the_rayservice_the_operator_may_patch(helm):
    docs = template(helm, *POOL, "serve.rayService.name=fleet", "serve.rayService.namespace=serving")
    rs = rayservice(docs)
    assert (rs["metadata"]["name"], rs["metadata"]["namespace"]) == ("fleet", "serving")
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-rayservice")]
    assert role["metadata"]["namespace"] == "serving"
    assert role["rules"][0]["resourceNames"] == ["fleet"]
    # The operator owns serveConfigV2: the chart never renders it, so an upgrade keeps the tenants.
    assert "serveConfigV2" not in rs["spec"]
    assert rs["spec"]["serveService"]["metadata"]["name"] == "fleet-serve-svc"  # what status.endpoint names


def test_the_pool_runs_the_ml_image_and_its_ray_with_the_autoscaler(helm):
    rs = rayservice(template(helm, *POOL, "pool.workers.minReplicas=2", "pool.workers.maxReplicas=6"))
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["enableInTreeAutoscaling"] is True
    (worker,) = cluster["workerGroupSpecs"]
    assert (worker["minReplicas"], worker["replicas"], worker["maxReplicas"]) == (2, 2, 6)
    for spec in pod_specs(rs).values():
        (container,) = spec["containers"]
        assert container["image"] == ML_IMAGE
    # Serve replicas go to the workers only: the head offers no CPUs or GPUs to Ray.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_gpu_workers_ask_for_their_gpus_on_the_chosen_accelerator(helm):
    rs = rayservice(template(helm, *POOL, "pool.workers.gpus=2", "pool.workers.acceleratorType=NVIDIA-H100-80GB-HBM3",
                             "compression.gpuResource=nvidia.com/gpu"))
    worker = pod_specs(rs)["worker"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    cpu = pod_specs(rayservice(template(helm, *POOL, "pool.workers.gpus=0")))["worker"]
    assert "nvidia.com/gpu" not in (cpu["containers"][0]["resources"].get("limits") or {})


def test_every_pool_pod_mounts_the_store_read_only_where_the_serve_config_points(helm):
    rs = rayservice(template(helm, *POOL, "modelStore.replicaPath=/store", "modelStore.group=2000"))
    for role, spec in pod_specs(rs).items():
        (container,) = spec["containers"]
        store = [m for m in container["volumeMounts"] if m["name"] == "model-store"]
        assert store == [{"name": "model-store", "mountPath": "/store", "readOnly": True}], role
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-store"]
        assert volume["persistentVolumeClaim"]["claimName"] == "models"
        assert spec["securityContext"]["fsGroup"] == 2000 and 2000 in spec["securityContext"]["supplementalGroups"]


def test_pool_pods_are_non_root_with_a_read_only_root(helm):
    rs = rayservice(template(helm, *POOL))
    cluster = rs["spec"]["rayClusterConfig"]
    for role, spec in pod_specs(rs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = spec["containers"][0]["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/tmp", "/home/ray", "/dev/shm"} <= mounts  # what Ray writes, on volumes
    assert cluster["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_hugging_face_token_reaches_the_pool_only_when_named(helm):
    def env(*sets):
        return {e["name"]: e for e in pod_specs(rayservice(template(helm, *POOL, *sets)))["worker"]["containers"][0]["env"]}

    assert "HF_TOKEN" not in env()
    token = env("pool.hfTokenSecret.name=hf", "pool.hfTokenSecret.key=tok")["HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}


@pytest.mark.parametrize("sets, message", [
    (("pool.create=true", "serve.backend=ray-api", "modelStore.claimName=models"), "pool.create needs serve.backend=rayservice"),
    (("pool.create=true",), "pool.create needs the model store"),
    ((*POOL, "pool.workers.minReplicas=3", "pool.workers.maxReplicas=2"), "maxReplicas must be >= pool.workers.minReplicas"),
])
def test_a_pool_that_cannot_work_is_refused_at_render_time(helm, sets, message):
    args = ["template", "df", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and message in out.stderr


def test_a_shared_store_makes_one_bound_claim_per_namespace(helm):
    docs = template(helm, "modelStore.claimName=models", "modelStore.share.namespaces={team-a,team-b}",
                    "modelStore.share.source.nfs.server=nfs.example", "modelStore.share.source.nfs.path=/models",
                    "serve.rayService.namespace=serving", namespace="deltafleet")
    claims = {c["metadata"]["namespace"]: c for c in by_kind(docs, "PersistentVolumeClaim")}
    volumes = {v["metadata"]["name"]: v for v in by_kind(docs, "PersistentVolume")}
    # The operator's namespace, the pool's, and every listed tenant namespace.
    assert set(claims) == {"deltafleet", "serving", "team-a", "team-b"}
    for ns, claim in claims.items():
        assert claim["metadata"]["name"] == "models"
        pv = volumes[claim["spec"]["volumeName"]]
        assert pv["spec"]["claimRef"] == {"namespace": ns, "name": "models"}
        assert pv["spec"]["nfs"] == {"server": "nfs.example", "path": "/models"}
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"  # the files outlive the release
        assert "ReadWriteMany" in pv["spec"]["accessModes"]
    assert len(volumes) == 4


def test_the_operator_is_in_the_stores_group_and_tells_jobs_to_use_it(helm):
    (deployment,) = by_kind(template(helm, "modelStore.group=2000"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert 2000 in pod["securityContext"]["supplementalGroups"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DELTAFLEET_STORE_GROUP"] == "2000"


def test_the_chart_with_a_pool_and_a_shared_store_lints_strict(helm):
    from k8s.test_chart_render import KUBE_VERSION

    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    for s in (*POOL, "modelStore.share.namespaces={team-a}", "modelStore.share.source.nfs.server=nfs.example",
              "modelStore.share.source.nfs.path=/models"):
        args += ["--set", s]
    assert "0 chart(s) failed" in helm(*args).stdout


def test_the_ray_pod_templates_carry_no_version_label_so_a_chart_upgrade_keeps_the_cluster(helm):
    """KubeRay hashes rayClusterConfig (all but worker replica counts): a chart or app version
    label in a pod template would make every chart upgrade start a second cluster (twice the GPUs)."""
    cluster = by_kind(template(helm, *POOL), "RayService")[0]["spec"]["rayClusterConfig"]
    for pod in (cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])):
        labels = pod["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, labels
        assert labels["app.kubernetes.io/part-of"] == "deltafleet"


def test_the_upgrade_strategy_is_blue_green_unless_the_admin_says_none(helm):
    """KubeRay's default for a changed cluster spec is a second cluster (twice the GPUs until it
    switches); `None` keeps the one cluster; anything else (the Gateway-API incremental mode
    needs options this chart does not render) is refused when rendering."""
    assert rayservice(template(helm, *POOL))["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert rayservice(template(helm, *POOL, "pool.upgradeStrategy=None"))["spec"]["upgradeStrategy"] == {"type": "None"}
    r = helm("template", "t", str(CHART), "--set", ",".join((*POOL, "pool.upgradeStrategy=NewClusterWithIncrementalUpgrade")),
             check=False)
    assert r.returncode != 0 and "upgradeStrategy" in r.stderr, r.stderr


def test_gpu_pools_ask_for_cuda_and_runtime_classes_reach_ray_pods_and_jobs(helm):
    """A replica with device auto and no visible GPU would serve on CPU in fp32, holding its
    GPU; with the chart's GPU pool the operator writes device cuda, so it fails to deploy
    (DEPLOY_FAILED, with the reason) instead. RuntimeClass: k3s/RKE2 GPU nodes need one."""
    def env(docs):
        c = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert env(template(helm, *POOL))["DELTAFLEET_SERVE_DEVICE"] == "cuda"
    assert env(template(helm, *POOL, "pool.workers.gpus=0"))["DELTAFLEET_SERVE_DEVICE"] == "auto"  # CPU workers
    assert env(template(helm))["DELTAFLEET_SERVE_DEVICE"] == "auto"  # someone else's RayService: theirs to say
    assert env(template(helm, *POOL, "serve.device=cpu"))["DELTAFLEET_SERVE_DEVICE"] == "cpu"
    docs = template(helm, *POOL, "pool.runtimeClassName=nvidia", "compression.runtimeClassName=nvidia")
    cluster = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    for pod in (cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])):
        assert pod["spec"]["runtimeClassName"] == "nvidia"
    assert env(docs)["DELTAFLEET_JOB_RUNTIME_CLASS"] == "nvidia"
    assert "runtimeClassName" not in by_kind(template(helm, *POOL), "RayService")[0]["spec"]["rayClusterConfig"][
        "headGroupSpec"]["template"]["spec"]
