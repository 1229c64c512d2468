"""The compression Job manifest and the reading of finished Jobs (pure functions)."""

import pytest
from cluster.binaries import kube_minor_schema
from kubernetes_validate import validate
from op_factories import compress_result, finetune

from deltafleet.operator import compression as comp
from deltafleet.operator import jobs
from deltafleet.operator.settings import Settings

SETTINGS = Settings(store_host_path="/srv/models", job_image="example/deltafleet-ml:1")


def build(**kw):
    ft = finetune(**kw)
    return ft, jobs.build_job(ft, comp.compression_hash(ft.spec), 3, 0, SETTINGS)


def test_job_is_a_valid_batch_v1_job():
    _, job = build(spec={"compression": {"gpus": 1, "nodeSelector": {"gpu": "a100"},
                                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                         "resources": {"requests": {"cpu": 4, "memory": "32Gi"}}}})
    validate(job, kube_minor_schema(), strict=True)


def test_job_name_labels_and_retry_policy():
    ft, job = build()
    assert job["metadata"]["name"] == "support-bot-compress-g3"
    assert jobs.build_job(ft, "h", 3, 2, SETTINGS)["metadata"]["name"] == "support-bot-compress-g3-r2"
    spec = job["spec"]
    assert spec["backoffLimit"] == 0  # the operator retries, one Job per attempt
    assert spec["activeDeadlineSeconds"] == ft.spec.active_deadline_seconds
    labels = job["metadata"]["labels"]
    assert labels[comp.LABEL_HASH] == comp.compression_hash(ft.spec)
    assert labels[comp.LABEL_FINETUNE] == "support-bot" and labels[comp.LABEL_ATTEMPT] == "0"
    assert spec["template"]["metadata"]["labels"] == labels


def test_container_command_security_and_store():
    _, job = build(spec={"compression": {"steps": 7, "gpus": 2}, "fineTunedModel": {"path": None, "huggingFace": "org/ft", "tokenSecretRef": {"name": "hf"}}})
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "example/deltafleet-ml:1"
    assert c["command"] == ["deltafleet", "compress"]
    args = c["args"]
    assert args[args.index("--base") + 1] == "/models/bases/tiny"
    assert args[args.index("--finetuned") + 1] == "org/ft"
    assert args[args.index("--out") + 1] == "/models/deltas/team-a/support-bot/g3"
    assert args[args.index("--steps") + 1] == "7"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["HF_HOME"]["value"].startswith("/tmp/")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/models"]]["hostPath"]["path"] == "/srv/models"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["restartPolicy"] == "Never"


def test_own_store_and_claim_win_over_default():
    _, job = build(spec={"modelStore": {"claimName": "team-store"}})
    vols = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "team-store"}} in vols


def test_no_store_is_refused():
    ft = finetune()
    with pytest.raises(ValueError, match="no model store"):
        jobs.build_job(ft, "h", 1, 0, Settings())


def test_compression_hash_ignores_gate_placement_and_serving():
    a = finetune()
    b = finetune(spec={"compression": {"minFidelity": 0.99, "gpus": 4, "image": "x/y:2"}, "serving": {"maxReplicas": 9}, "backoffLimit": 7})
    c = finetune(finetuned="finetunes/other")
    d = finetune(spec={"compression": {"steps": 3}})
    assert comp.compression_hash(a.spec) == comp.compression_hash(b.spec)
    assert comp.compression_hash(a.spec) != comp.compression_hash(c.spec)
    assert comp.compression_hash(a.spec) != comp.compression_hash(d.spec)


def test_retry_delay_doubles_and_caps():
    assert [comp.retry_delay(n, 10, 60) for n in range(6)] == [0, 10, 20, 40, 60, 60]


RESULT = compress_result()


def job_with(cond_type):
    return {"status": {"conditions": [{"type": cond_type, "status": "True", "reason": "DeadlineExceeded" if cond_type == "Failed" else "",
                                       "lastTransitionTime": "2026-01-01T00:00:05Z"}]}}


def pod_with(code, message):
    return {"status": {"containerStatuses": [{"name": "compress", "state": {"terminated": {"exitCode": code, "message": message}}}]}}


def test_outcome_success_reads_the_termination_message():
    o = jobs.outcome(job_with("Complete"), pod_with(0, RESULT.termination_message()))
    assert o.state == jobs.JobState.SUCCEEDED and o.result == RESULT


def test_outcome_failure_names_exit_code_and_last_log_line():
    o = jobs.outcome(job_with("Failed"), pod_with(2, "Traceback...\n  File x\nValueError: --base: no such folder /models/x\n"))
    assert o.state == jobs.JobState.FAILED
    assert "exit code 2" in o.reason and "ValueError: --base: no such folder" in o.reason and "DeadlineExceeded" in o.reason
    assert o.finished_at == "2026-01-01T00:00:05Z"


def test_outcome_running_and_garbage_message():
    assert jobs.outcome({"status": {}}, None).state == jobs.JobState.RUNNING
    assert jobs.outcome(job_with("Complete"), pod_with(0, "not json")).result is None


def test_pinned_hub_revision_travels_as_id_at_revision():
    _, job = build(spec={"baseModel": {"path": None, "huggingFace": "org/base", "revision": "0123abcd"}})
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--base") + 1] == "org/base@0123abcd"


def test_job_args_parse_with_the_real_compress_cli():
    from deltafleet.compress.cli import parser

    _, job = build(spec={"compression": {"steps": 5, "lr": 0.001, "batchSize": 3, "loss": "kl", "scalePerRow": True,
                                         "calibration": {"path": "data/cal.txt", "samples": 9, "seqLen": 64}}})
    args = parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (args.steps, args.lr, args.batch_size, args.loss, args.scale_per_row) == (5, 0.001, 3, "kl", True)
    assert (args.samples, args.seq_len, args.calibration, args.device) == (9, 64, "/models/data/cal.txt", "cpu")
    assert args.termination_log == "/dev/termination-log"


def test_a_hub_base_is_kept_in_the_store_and_a_path_base_is_not():
    _, job = build(spec={"baseModel": {"path": None, "huggingFace": "org/base", "revision": "main"}})
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--base-store") + 1] == "/models/bases/hub" == comp.base_store_dir()
    _, job = build()  # baseModel.path: already in the store
    assert "--base-store" not in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_jobs_write_as_the_stores_group():
    from dataclasses import replace

    ft = finetune()
    job = jobs.build_job(ft, comp.compression_hash(ft.spec), 1, 0, replace(SETTINGS, store_group=2345))
    pod = job["spec"]["template"]["spec"]["securityContext"]
    assert pod["fsGroup"] == 2345 and 2345 in pod["supplementalGroups"]


def test_the_stored_base_reaches_the_delta_status():
    from deltafleet.operator import api

    result = compress_result().model_copy(update={"base_snapshot": "/models/bases/hub/org--base/" + "a" * 40})
    assert api.DeltaStatus.from_result(result).base_snapshot == "/models/bases/hub/org--base/" + "a" * 40


def test_compression_pods_get_the_image_pull_secrets():
    from dataclasses import replace

    ft = finetune()
    job = jobs.build_job(ft, "h", 1, 0, replace(SETTINGS, job_image_pull_secrets="regcred, mirror"))
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in jobs.build_job(ft, "h", 1, 0, SETTINGS)["spec"]["template"]["spec"]


def test_compression_pods_get_the_runtime_class():
    from dataclasses import replace

    job = jobs.build_job(finetune(), "h", 1, 0, replace(SETTINGS, job_runtime_class="nvidia"))
    assert job["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in jobs.build_job(finetune(), "h", 1, 0, SETTINGS)["spec"]["template"]["spec"]
