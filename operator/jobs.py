"""The compression Job: its manifest (a pure function of the FineTune and the operator
settings) and what a finished Job means (a pure function of the Job and its pod).

Retries: the Job itself has `backoffLimit: 0` and the operator makes a new Job per attempt
(`-r<n>`). Job-level retries would reuse one Job, overwrite the failed pod's termination
message with the next one and let the cluster choose the timing; one Job per attempt keeps
every attempt's exit code and message in the API for `kubectl describe`, lets the status
say "attempt 2 of 4 failed: …" and gives an exponential backoff the operator controls.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import ValidationError

from deltafleet.compress.result import CompressResult
from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator.settings import Settings

CONTAINER = "compress"
TERMINATION_LOG = "/dev/termination-log"
STORE_VOLUME, TMP_VOLUME = "model-store", "tmp"


def compress_args(ft: api.FineTune, generation: int) -> list[str]:
    """`deltafleet compress …` arguments (the CLI of compress/cli.py)."""
    spec, c = ft.spec, ft.spec.compression
    args = [
        "--base", spec.base_model.reference(),
        "--finetuned", spec.fine_tuned_model.reference(),
        "--out", comp.output_dir(ft.metadata.namespace or "", ft.metadata.name, generation),
        "--steps", str(c.steps),
        "--lr", repr(c.lr),
        "--batch-size", str(c.batch_size),
        "--loss", str(c.loss),
        "--samples", str(c.calibration.samples),
        "--seq-len", str(c.calibration.seq_len),
        "--dtype", str(c.dtype),
        "--seed", str(c.seed),
        "--device", "cuda" if c.gpus > 0 else "cpu",
        "--termination-log", TERMINATION_LOG,
    ]
    if spec.base_model.hugging_face:
        # Keep the exact snapshot in the store: replicas load it from there (no token, no drift).
        args += ["--base-store", comp.base_store_dir()]
    if c.calibration.path:
        args += ["--calibration", f"{api.MODEL_STORE_MOUNT}/{c.calibration.path}"]
    if c.scale_per_row:
        args.append("--scale-per-row")
    if c.compress_embeddings:
        args.append("--compress-embeddings")
    return args


def store_volume(ft: api.FineTune, settings: Settings) -> dict:
    store = ft.spec.model_store
    claim = store.claim_name if store else settings.store_claim
    host = store.host_path if store else settings.store_host_path
    if claim:
        return {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    if host:
        return {"name": STORE_VOLUME, "hostPath": {"path": host, "type": "DirectoryOrCreate"}}
    raise ValueError("no model store: set spec.modelStore or the operator's --store-claim / --store-host-path")


def hf_token_env(ft: api.FineTune) -> list[dict]:
    """HF_TOKEN from the first token Secret named (the fine-tune's, else the base's)."""
    ref = ft.spec.fine_tuned_model.token_secret_ref or ft.spec.base_model.token_secret_ref
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def resources(c: api.Compression, gpu_resource: str) -> dict:
    out: dict = {}
    if c.resources and c.resources.requests:
        out["requests"] = dict(c.resources.requests)
    if c.resources and c.resources.limits:
        out["limits"] = dict(c.resources.limits)
    if c.gpus > 0:  # extended resources: limits only (requests default to them)
        out.setdefault("limits", {})[gpu_resource] = c.gpus
    return out


def labels(ft: api.FineTune, digest: str, generation: int, attempt: int) -> dict[str, str]:
    return {
        comp.LABEL_MANAGED_BY: comp.MANAGED_BY,
        comp.LABEL_COMPONENT: "compression",
        comp.LABEL_FINETUNE: ft.metadata.name,
        comp.LABEL_HASH: digest,
        comp.LABEL_GENERATION: str(generation),
        comp.LABEL_ATTEMPT: str(attempt),
    }


def container(ft: api.FineTune, generation: int, settings: Settings) -> dict:
    """The compress container: read-only root, no privileges, the result in its termination message."""
    c = ft.spec.compression
    return {
        "name": CONTAINER,
        "image": c.image or settings.job_image,
        "imagePullPolicy": settings.job_image_pull_policy,
        "command": ["deltafleet", "compress"],
        "args": compress_args(ft, generation),
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/tmp/hf"},  # the root FS is read-only; caches go to the emptyDir
            {"name": "DELTAFLEET_TERMINATION_LOG", "value": TERMINATION_LOG},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *hf_token_env(ft),
        ],
        "resources": resources(c, settings.gpu_resource),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePath": TERMINATION_LOG,
        # The result JSON on success; the log tail when the process dies without writing one.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": STORE_VOLUME, "mountPath": api.MODEL_STORE_MOUNT},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }


def pod_spec(ft: api.FineTune, generation: int, settings: Settings) -> dict:
    """The pod of one attempt: never restarted, no API token, the store's group, the settings' extras."""
    c = ft.spec.compression
    uid = settings.job_run_as_user
    spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the Job never talks to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            # The store's group: outputs are group-writable (compress sets umask 002), so the
            # operator, in the same group, can delete them when the FineTune goes.
            "fsGroup": settings.store_group,
            "supplementalGroups": [settings.store_group],
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(ft, generation, settings)],
        "volumes": [store_volume(ft, settings), {"name": TMP_VOLUME, "emptyDir": {}}],
    }
    if settings.job_service_account:
        spec["serviceAccountName"] = settings.job_service_account
    if settings.job_runtime_class:  # the GPU runtime where it is not the default (k3s, RKE2: "nvidia")
        spec["runtimeClassName"] = settings.job_runtime_class
    secrets = [n.strip() for n in settings.job_image_pull_secrets.split(",") if n.strip()]
    if secrets:  # a private registry: without them every Job ends ErrImagePull
        spec["imagePullSecrets"] = [{"name": n} for n in secrets]
    if c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        spec["tolerations"] = [t.to_k8s() for t in c.tolerations]
    return spec


def build_job(ft: api.FineTune, digest: str, generation: int, attempt: int, settings: Settings) -> dict:
    """The Job of one compression attempt (owner reference added by the caller with kopf.adopt)."""
    job_labels = labels(ft, digest, generation, attempt)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": comp.job_name(ft.metadata.name, generation, attempt),
            "namespace": ft.metadata.namespace,
            "labels": job_labels,
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": ft.spec.active_deadline_seconds,
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec(ft, generation, settings)},
        },
    }


# ---------------------------------------------------------------- reading a finished Job

class JobState(str, Enum):
    """Where one compression attempt (a Job) stands."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Outcome:
    state: JobState
    reason: str = ""  # one line for the status: exit code, Job condition reason, message
    finished_at: str = ""  # RFC 3339, when the Job finished (backoff counts from here)
    result: CompressResult | None = None
    waiting: str = ""  # while running: why its pod cannot start ("ImagePullBackOff: ..."), if it cannot


def _job_condition(job: dict, type_: str) -> dict | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def terminated_state(pod: dict | None) -> dict:
    if not pod:
        return {}
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return (cs.get("state") or {}).get("terminated") or {}
    return {}


# Waiting reasons of a container that will not start by itself (the kubelet keeps retrying,
# the Job never fails before its deadline): surfaced in the FineTune's status at once.
STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}


def pod_cannot_start(pod: dict | None) -> str:
    """One line saying why the pod cannot start (unschedulable, image, config), or ""."""
    if not pod:
        return ""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return f"{waiting['reason']}: {_last_line(waiting.get('message') or '')}".rstrip(": ")
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return f"Unschedulable: {_last_line(c.get('message') or '')}".rstrip(": ")
    return ""


def parse_result(text: str | None) -> CompressResult | None:
    if not text or not text.strip().startswith("{"):
        return None
    try:
        return CompressResult.model_validate_json(text.strip())
    except ValidationError:
        return None


def outcome(job: dict, pod: dict | None) -> Outcome:
    """What a Job says: still running, succeeded (with the result from the termination
    message, if it parsed) or failed (with the pod's exit code and message)."""
    done = _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet")
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    term = terminated_state(pod)
    if done and not failed:
        return Outcome(JobState.SUCCEEDED, "", done.get("lastTransitionTime", ""), parse_result(term.get("message")))
    if not failed:
        return Outcome(JobState.RUNNING, waiting=pod_cannot_start(pod))
    parts = [failed.get("reason") or "Failed"]
    if term:
        parts.append(f"exit code {term.get('exitCode')}")
        if term.get("reason") and term.get("reason") not in ("Error", "Completed"):
            parts.append(term["reason"])
        message = _last_line(term.get("message") or "")
        if message:
            parts.append(message)
    elif failed.get("message"):
        parts.append(failed["message"])
    return Outcome(JobState.FAILED, ": ".join(parts), failed.get("lastTransitionTime", ""))


def _last_line(text: str) -> str:
    """The last meaningful line of a log tail (a Python traceback ends with the error)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
