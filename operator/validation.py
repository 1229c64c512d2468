"""What the CRD schema cannot check: rules that need the operator's settings or span fields.
Each problem is one line naming the field; any problem makes the spec impossible (a
PermanentError with an InvalidSpec condition), never retried until the spec changes."""

from __future__ import annotations

import re

from kubernetes.utils import parse_quantity

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator.settings import Settings

TENANT_NAME = re.compile(api.TENANT_NAME_PATTERN)
MAX_LABEL = 63


def spec_problems(ft: api.FineTune, settings: Settings) -> list[str]:
    spec, name = ft.spec, ft.metadata.name
    problems = []
    if spec.base_model.reference() == spec.fine_tuned_model.reference():  # the CRD's CEL rule, again
        problems.append("spec.fineTunedModel: is the same model as spec.baseModel; there is nothing to compress")
    last_job = comp.job_name(name, max(ft.metadata.generation or 1, 1), spec.backoff_limit)
    if len(last_job) > MAX_LABEL:
        problems.append(f"metadata.name: {name!r} is too long: Job name {last_job!r} would exceed {MAX_LABEL} characters")
    model = ft.model_name()
    if not TENANT_NAME.fullmatch(model):
        problems.append(f"spec.serving.modelName: {model!r} must be segments of [A-Za-z0-9._-] separated by '/'")
    if model in api.RESERVED_MODEL_NAMES or model == ft.pool():
        problems.append(f"spec.serving.modelName: {model!r} is reserved for the pool's base model")
    if spec.model_store is None and not (settings.store_claim or settings.store_host_path):
        problems.append("spec.modelStore: not set and the operator has no default store (--store-claim / --store-host-path)")
    return problems


def policy_problems(ft: api.FineTune, settings: Settings) -> list[str]:
    """What the admin's policy refuses in this spec, each naming the field and the policy."""
    c, problems = ft.spec.compression, []
    if ft.spec.model_store is not None and ft.spec.model_store.host_path and settings.policy_host_path != "allow":
        problems.append("spec.modelStore.hostPath: FineTunes may not mount a node's files "
                        "(policy: chart policy.allowHostPath / --policy-host-path allow)")
    allowed = {settings.job_image, *(i.strip() for i in settings.policy_allowed_images.split(",") if i.strip())}
    if c.image is not None and c.image not in allowed:
        problems.append(f"spec.compression.image: {c.image!r} is not an allowed image "
                        f"(policy: {', '.join(sorted(allowed))}; chart policy.allowedImages)")
    if c.gpus > settings.policy_max_gpus:
        problems.append(f"spec.compression.gpus: {c.gpus} is above the policy's {settings.policy_max_gpus} (chart policy.maxGpus)")
    for kind in ("requests", "limits"):  # GPUs asked through resources count too (before: gpus: 0 + 16 in limits passed)
        for name, value in ((getattr(c.resources, kind) or {}) if c.resources is not None else {}).items():
            if (name == settings.gpu_resource or name.endswith("/gpu")) and _count(value) > settings.policy_max_gpus:
                problems.append(f"spec.compression.resources.{kind}.{name}: {value} is above the policy's "
                                f"{settings.policy_max_gpus} GPUs (chart policy.maxGpus)")
    if settings.policy_max_memory and c.resources is not None:
        ceiling = parse_quantity(settings.policy_max_memory)
        for kind in ("requests", "limits"):
            value = (getattr(c.resources, kind) or {}).get("memory")
            if value is not None and parse_quantity(str(value)) > ceiling:
                problems.append(f"spec.compression.resources.{kind}.memory: {value} is above the policy's "
                                f"{settings.policy_max_memory} (chart policy.maxMemory)")
    serving = ft.spec.serving  # a pool takes the largest ask of its tenants: one tenant must not size it for all
    for field, value in (("minReplicas", serving.min_replicas), ("maxReplicas", serving.max_replicas)):
        if value > settings.policy_max_replicas:
            problems.append(f"spec.serving.{field}: {value} is above the policy's {settings.policy_max_replicas} "
                            "replicas per pool (chart policy.maxReplicasPerPool)")
    if serving.gpus_per_replica > settings.policy_max_gpus_per_replica:
        problems.append(f"spec.serving.gpusPerReplica: {serving.gpus_per_replica:g} is above the policy's "
                        f"{settings.policy_max_gpus_per_replica:g} (chart policy.maxGpusPerReplica)")
    if ft.spec.active_deadline_seconds > settings.policy_max_deadline_seconds:
        problems.append(f"spec.activeDeadlineSeconds: {ft.spec.active_deadline_seconds} is above the policy's "
                        f"{settings.policy_max_deadline_seconds} (chart policy.maxDeadlineSeconds)")
    return problems


def _count(value) -> float:
    try:
        return float(parse_quantity(str(value)))
    except (ValueError, TypeError):
        return float("inf")  # not a number a device plugin would accept either: refuse it
