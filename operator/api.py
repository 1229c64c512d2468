"""The `FineTune` API (deltafleet.dev/v1alpha1): pydantic models for spec and status.

These models are the source of truth. `deltafleet crds` (operator/crdgen.py) turns them
into the CRD's structural OpenAPI schema, so every field's description here is what
`kubectl explain finetune.spec…` prints, and the `x-kubernetes-validations` (CEL) rules
attached below are enforced by the API server itself. The operator parses objects with
`FineTune.model_validate(body)` and checks again in code what a schema cannot say.

Python names are snake_case; JSON (and the CRD) is camelCase through the alias generator.
Construct by either name (`populate_by_name`), dump with `by_alias=True`.
"""

from __future__ import annotations

import hashlib
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from deltafleet.serving.config import BASE_ALIASES, POOL_NAME_MAX_LENGTH, POOL_NAME_PATTERN, TENANT_NAME_PATTERN

GROUP = "deltafleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTune"
PLURAL = "finetunes"
SINGULAR = "finetune"
SHORT_NAMES = ["ft"]
CATEGORIES = ["deltafleet"]  # not "all": `kubectl get all` should not list model resources

# Where the model-store volume is mounted in compression Jobs and serving replicas.
# `path` sources and delta outputs are relative to it.
MODEL_STORE_MOUNT = "/models"
# Longest FineTune name: the Job `<name>-compress-g<gen>-r<n>` must fit a 63-char label value.
MAX_NAME_LENGTH = 40
# OpenAI `model` names a replica answers with its base model: the serve-config contract's.
RESERVED_MODEL_NAMES = BASE_ALIASES


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (checked by the API server, not by pydantic)."""
    out = {"rule": rule, "message": message}
    if field_path:  # a JSON path relative to the node the rule sits on: ".revision"
        out["fieldPath"] = field_path if field_path.startswith(".") else f".{field_path}"
    if reason:
        out["reason"] = reason
    return out


def _cel_schema(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_k8s(self) -> dict[str, Any]:
        """JSON-ready dict with camelCase keys and unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- small shared types

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_HF_REPO_ID = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(/[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$"
# The serving app's tenant-name rule (TENANT_NAME_PATTERN of the serve-config contract):
# segments of [A-Za-z0-9._-] separated by '/'. The schema checks an explicit modelName;
# validation.py the default one.


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(_QUANTITY, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
    return value


# A Kubernetes resource quantity ("500m", "16Gi", 4): int-or-string in the schema.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": _QUANTITY, "x-kubernetes-int-or-string": True}),
]


def _check_relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/") or "\\" in value:
        raise ValueError(f"{value!r} must be a relative path inside the model store (no leading '/', no '..')")
    return value


RelativePath = Annotated[
    str,
    Field(min_length=1, max_length=512, pattern=r"^[^/\\]"),
    AfterValidator(_check_relative_path),
]


class SecretKeyRef(_Model):
    """A key of a Secret in the FineTune's namespace."""

    name: str = Field(description="Name of the Secret (same namespace as the FineTune).", min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)
    key: str = Field("token", description="Key inside the Secret whose value is used.", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class SecretRef(_Model):
    """A whole Secret in the FineTune's namespace."""

    name: str = Field(description="Name of the Secret (same namespace as the FineTune).", min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)


# ---------------------------------------------------------------- model sources


class ModelSource(_Model):
    """Where a model comes from: a Hugging Face Hub repository, or a folder in the model store.
    Exactly one of `huggingFace` or `path`."""

    model_config = ConfigDict(
        json_schema_extra=_cel_schema(
            cel("has(self.huggingFace) != has(self.path)", "exactly one of huggingFace or path must be set"),
            cel("!has(self.revision) || has(self.huggingFace)", "revision applies only to a huggingFace source", "revision"),
            cel("!has(self.tokenSecretRef) || has(self.huggingFace)", "tokenSecretRef applies only to a huggingFace source", "tokenSecretRef"),
            cel("!has(self.path) || !self.path.split('/').exists(s, s == '..')", "path must not contain '..' segments", "path"),
        )
    )

    hugging_face: str | None = Field(
        None,
        description="Hugging Face Hub repository id, e.g. `meta-llama/Llama-2-7b-hf` (downloaded by the compression Job and the serving replicas).",
        min_length=1,
        max_length=200,
        pattern=_HF_REPO_ID,
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of a huggingFace source; default the repository's default branch.", min_length=1, max_length=200
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a Hub access token for gated or private repositories; passed to the Job as HF_TOKEN."
    )
    path: RelativePath | None = Field(
        None,
        description=f"Folder of a `save_pretrained` checkpoint inside the model store, relative to its mount ({MODEL_STORE_MOUNT}), e.g. `bases/llama-2-7b`.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelSource":
        if (self.hugging_face is None) == (self.path is None):
            raise ValueError("exactly one of huggingFace or path must be set")
        if self.hugging_face is None and (self.revision or self.token_secret_ref):
            raise ValueError("revision and tokenSecretRef apply only to a huggingFace source")
        return self

    def reference(self) -> str:
        """What a Job or replica loads: the Hub id (`id@revision` when pinned) or the mounted path."""
        if self.hugging_face is None:
            return f"{MODEL_STORE_MOUNT}/{self.path}"
        return f"{self.hugging_face}@{self.revision}" if self.revision else self.hugging_face

    def display(self) -> str:
        return self.hugging_face if self.hugging_face is not None else f"store:{self.path}"


class ModelStore(_Model):
    """The shared volume holding `path` models and the compressed deltas. Mounted read-write
    at /models in compression Jobs (and read-only in serving replicas). Exactly one of
    `claimName` or `hostPath`."""

    model_config = ConfigDict(
        json_schema_extra=_cel_schema(cel("has(self.claimName) != has(self.hostPath)", "exactly one of claimName or hostPath must be set"))
    )

    claim_name: str | None = Field(
        None,
        description="PersistentVolumeClaim in the FineTune's namespace (ReadWriteMany when Jobs and replicas share it across nodes).",
        min_length=1,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
    )
    host_path: str | None = Field(
        None, description="Absolute directory on the node (single-node clusters and tests).", min_length=2, max_length=1024, pattern=r"^/"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelStore":
        if (self.claim_name is None) == (self.host_path is None):
            raise ValueError("exactly one of claimName or hostPath must be set")
        return self


# ---------------------------------------------------------------- compression


class Loss(str, Enum):
    mse = "mse"
    kl = "kl"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Calibration(_Model):
    """Text the scales are distilled on. Default: generated by sampling the fine-tuned model
    itself, so no data set is needed."""

    path: RelativePath | None = Field(
        None,
        description=f"A .txt or .jsonl file (or a folder of them) in the model store, relative to {MODEL_STORE_MOUNT}. Unset: text sampled from the fine-tuned model.",
    )
    samples: int = Field(800, description="Number of calibration sequences.", ge=1, le=1_000_000)
    seq_len: int = Field(128, description="Tokens per calibration sequence.", ge=8, le=32768)


class Toleration(_Model):
    """A Kubernetes toleration for the compression Job's pod (same fields as a Pod's)."""

    model_config = ConfigDict(
        json_schema_extra=_cel_schema(
            cel("!(self.operator == 'Exists' && has(self.value))", "value must be empty when operator is Exists", "value"),
            cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')", "tolerationSeconds applies only to effect NoExecute", "tolerationSeconds"),
        )
    )

    key: str | None = Field(None, description="Taint key the toleration applies to; empty with operator Exists matches all taints.", max_length=316)
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match when operator is Equal.", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long the pod stays bound after the taint appears.")

    @model_validator(mode="after")
    def _consistent(self) -> "Toleration":
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies only to effect NoExecute")
        return self


class Resources(_Model):
    """CPU and memory for the compression Job's container (GPUs: see `gpus`)."""

    requests: dict[str, Quantity] | None = Field(None, description="Minimum resources, e.g. {cpu: 4, memory: 32Gi}.")
    limits: dict[str, Quantity] | None = Field(None, description="Maximum resources, e.g. {memory: 64Gi}.")


class Compression(_Model):
    """How the fine-tune is compressed into a 1-bit delta (BitDelta: signs of W_ft - W_base and a
    scale per matrix, then scale distillation), and where the compression Job runs."""

    steps: int = Field(200, description="Scale-distillation steps (0: stage 1 only, scales = mean |delta|).", ge=0, le=100_000)
    lr: float = Field(1e-4, description="Adam learning rate of scale distillation.", gt=0, le=1)
    batch_size: int = Field(4, description="Calibration sequences per distillation step.", ge=1, le=1024)
    loss: Loss = Field(Loss.mse, description="Distillation loss on the logits: mse (as in the paper) or kl.")
    calibration: Calibration = Field(
        default_factory=Calibration, description="Calibration text for scale distillation.", json_schema_extra={"default": {}}
    )
    scale_per_row: bool = Field(False, description="One scale per output row instead of one per matrix (more bytes, higher fidelity).")
    compress_embeddings: bool = Field(False, description="Also 1-bit compress embeddings and lm_head when their shapes match the base (else stored whole).")
    dtype: DType = Field(DType.auto, description="Dtype the models are loaded in: auto (the checkpoint's), float32, float16 or bfloat16.")
    seed: int = Field(0, description="Random seed (calibration sampling and batching).", ge=0, le=2**31 - 1)
    min_fidelity: float = Field(
        0.9,
        description="Quality gate: the share of the fine-tune's eval-loss improvement over the base that the delta must retain, (L_base - L_delta) / (L_base - L_ft). Below it the FineTune is not served.",
        ge=0,
        le=1,
    )
    gpus: int = Field(1, description="GPUs for the compression Job (0: run on CPU).", ge=0, le=16)
    resources: Resources | None = Field(None, description="CPU and memory requests and limits of the compression Job.")
    image: str | None = Field(None, description="Container image of the compression Job; default the operator's configured image.", min_length=1, max_length=512)
    node_selector: dict[str, str] | None = Field(None, description="Node labels the compression Job's pod must match.")
    tolerations: list[Toleration] | None = Field(
        None, description="Tolerations of the compression Job's pod (e.g. for GPU node taints).", max_length=32
    )


# ---------------------------------------------------------------- serving


class Serving(_Model):
    """How the delta is served: as a tenant of a Ray Serve pool (one application per base model)."""

    model_config = ConfigDict(
        json_schema_extra=_cel_schema(
            # has(): the CRD's own `default: {}` is checked before nested defaults fill it in.
            cel("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas", "minReplicas"),
            cel("has(self.modelName) == has(oldSelf.modelName)", "modelName is immutable once set", "modelName"),
            cel("has(self.pool) == has(oldSelf.pool)", "pool is immutable once set", "pool"),
            cel("!has(self.modelName) || !(self.modelName in " + str(list(RESERVED_MODEL_NAMES)) + ")",
                f"modelName {', '.join(RESERVED_MODEL_NAMES)} is reserved for the pool's base model", "modelName"),
            cel("!has(self.modelName) || !has(self.pool) || self.modelName != self.pool",
                "modelName must differ from pool: the pool's own name serves its base model", "modelName"),
        )
    )

    pool: str | None = Field(
        None,
        description="Ray Serve application (one base model, many tenants) that serves this delta; default derived from the base model. All FineTunes of a pool must share its base. Immutable.",
        min_length=1,
        max_length=50,
        pattern=POOL_NAME_PATTERN,
        json_schema_extra=_cel_schema(cel("self == oldSelf", "pool is immutable", reason="FieldValueForbidden")),
    )
    model_name: str | None = Field(
        None,
        description="Model name clients send in OpenAI requests (`model`); default `<namespace>/<name>`. Immutable.",
        min_length=1,
        max_length=253,
        pattern=TENANT_NAME_PATTERN,
        json_schema_extra=_cel_schema(cel("self == oldSelf", "modelName is immutable", reason="FieldValueForbidden")),
    )
    min_replicas: int = Field(1, description="Fewest replicas of the pool this tenant asks for (0 allows scale to zero).", ge=0, le=1000)
    max_replicas: int = Field(4, description="Most replicas of the pool this tenant asks for.", ge=1, le=1000)
    target_ongoing_requests: float | None = Field(
        None, description="Ray Serve autoscaling target: ongoing requests per replica (default: 1.5 x the pool's batch size, "
        "so a replica's batch is full before another is added).", gt=0, le=10_000)
    gpus_per_replica: float = Field(1, description="GPUs per serving replica (fractions share a GPU).", ge=0, le=16)
    api_key_secret_ref: SecretRef | None = Field(
        None, description="Secret whose every value is an API key that may call this model (`Authorization: Bearer <key>`). "
        "Only the keys' sha256 digests reach the serving pool; editing the Secret rotates the keys within a resync. "
        "Required when the operator's pools use API keys (the default).")

    @model_validator(mode="after")
    def _replica_range(self) -> "Serving":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})")
        return self


# ---------------------------------------------------------------- spec


class DeletionPolicy(str, Enum):
    Delete = "Delete"
    Retain = "Retain"


class FineTuneSpec(_Model):
    """A fully fine-tuned model to compress into a 1-bit delta against its base and serve
    as a tenant of the base's Ray Serve pool."""

    model_config = ConfigDict(
        json_schema_extra=_cel_schema(
            # The same reference as ModelSource.reference(): one path, or one Hub id at one revision.
            cel("!(has(self.baseModel.path) && has(self.fineTunedModel.path) && self.baseModel.path == self.fineTunedModel.path)"
                " && !(has(self.baseModel.huggingFace) && has(self.fineTunedModel.huggingFace)"
                " && self.baseModel.huggingFace == self.fineTunedModel.huggingFace"
                " && (has(self.baseModel.revision) ? self.baseModel.revision : '')"
                " == (has(self.fineTunedModel.revision) ? self.fineTunedModel.revision : ''))",
                "fineTunedModel is the same model as baseModel: there is nothing to compress", "fineTunedModel"),
        )
    )

    base_model: ModelSource = Field(
        description="The base model the fine-tune was trained from; the pool serves it once for all its tenants. Immutable.",
        json_schema_extra=_cel_schema(cel("self == oldSelf", "baseModel is immutable; create a new FineTune for another base", reason="FieldValueForbidden")),
    )
    fine_tuned_model: ModelSource = Field(
        description="The fully fine-tuned model to compress. Changing it starts a new compression."
    )
    model_store: ModelStore | None = Field(
        None, description=f"Shared volume mounted at {MODEL_STORE_MOUNT}: `path` models are read from it, deltas written to it. Default: the operator's configured store."
    )
    compression: Compression = Field(
        default_factory=Compression, description="Compression settings and the compression Job's placement.", json_schema_extra={"default": {}}
    )
    serving: Serving = Field(default_factory=Serving, description="Serving settings (pool, replicas, model name).", json_schema_extra={"default": {}})
    backoff_limit: int = Field(3, description="Compression attempts retried after a failure before the FineTune is Failed.", ge=0, le=20)
    active_deadline_seconds: int = Field(
        21600, description="Longest one compression attempt may run before it is stopped and counted as failed.", ge=60, le=7 * 24 * 3600
    )
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.Delete, description="What happens to the delta files in the model store when the FineTune is deleted: Delete or Retain."
    )

    def pool_name(self) -> str:
        """`serving.pool`, or one derived from the base model (a DNS label, stable for a base)."""
        if self.serving.pool:
            return self.serving.pool
        return derive_pool(self.base_model)


def derive_pool(base: ModelSource) -> str:
    """A pool name for a base: its last path component as a DNS label, plus a short hash so
    different bases with the same folder name never share a pool."""
    ref = base.display()
    stem = re.sub(r"[^a-z0-9]+", "-", ref.rsplit("/", 1)[-1].lower()).strip("-")[:40].strip("-") or "pool"
    return f"{stem}-{hashlib.sha256(ref.encode()).hexdigest()[:6]}"


# ---------------------------------------------------------------- status


class Phase(str, Enum):
    """Display only (`kubectl get ft`); conditions are the truth."""

    Pending = "Pending"
    Compressing = "Compressing"
    Retrying = "Retrying"
    Rejected = "Rejected"  # compressed, but below minFidelity
    Deploying = "Deploying"  # compressed, waiting for the pool to serve it
    Serving = "Serving"
    Failed = "Failed"
    Deleting = "Deleting"


class Condition(_Model):
    """A condition in the Kubernetes style (metav1.Condition)."""

    type: str = Field(description="Compressed, Served or Ready.", min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase reason for the last transition.", min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field("", description="Human-readable details.", max_length=32768)
    last_transition_time: str = Field(description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, description="metadata.generation the condition was computed from.", ge=0)


class FidelityStatus(_Model):
    """Eval figures of the compression Job on held-out text of the fine-tune's domain."""

    retained_improvement: float = Field(description="(L_base - L_delta) / (L_base - L_ft): share of the fine-tune's improvement the delta keeps.")
    retained_improvement_initial: float | None = Field(None, description="The same before scale distillation.")
    loss_base: float | None = Field(None, description="Eval loss of the base model.")
    loss_finetuned: float | None = Field(None, description="Eval loss of the fine-tuned model.")
    loss_initial: float | None = Field(None, description="Eval loss of base + delta before scale distillation.")
    loss_delta: float | None = Field(None, description="Eval loss of base + delta.")
    kl: float | None = Field(None, description="Mean per-token KL(fine-tune || base + delta).")
    kl_initial: float | None = Field(None, description="The same before scale distillation.")
    eval_tokens: int | None = Field(None, description="Tokens evaluated.", ge=0)


class DeltaStatus(_Model):
    """The compressed delta of the last successful compression."""

    uri: str = Field(description="Where the delta file is, e.g. file:///models/deltas/<ns>/<name>/g<gen>/delta.safetensors.", max_length=4096)
    bytes: int = Field(description="Size of the delta file.", ge=0, json_schema_extra={"format": "int64"})
    finetuned_bytes: int | None = Field(None, description="Size of the fine-tune's parameters.", ge=0, json_schema_extra={"format": "int64"})
    compression_ratio: float = Field(description="finetunedBytes / bytes.")
    base_fingerprint: str | None = Field(None, description="Fingerprint of the base weights the delta was built on.", max_length=256)
    base_snapshot: str | None = Field(
        None, description="The Hub base as the Job stored it (/models/bases/hub/<org>--<name>/<commit>): what replicas load.", max_length=4096
    )
    generation: int | None = Field(None, description="metadata.generation that was compressed.", ge=0)
    fidelity: FidelityStatus = Field(description="Eval figures of the delta.")

    @classmethod
    def from_result(cls, result: Any, generation: int | None = None) -> "DeltaStatus":
        """From a `deltafleet.compress.result.CompressResult` (duck-typed: no import cycle)."""
        f = result.fidelity
        return cls(
            uri=result.delta_uri,
            bytes=result.sizes.delta_bytes,
            finetuned_bytes=result.sizes.finetuned_bytes,
            compression_ratio=result.sizes.compression_ratio,
            base_fingerprint=result.base_fingerprint,
            base_snapshot=getattr(result, "base_snapshot", None),
            generation=generation,
            fidelity=FidelityStatus(**{k: getattr(f, k) for k in FidelityStatus.model_fields if hasattr(f, k)}),
        )


class FineTuneStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(None, description="metadata.generation the operator last acted on.", ge=0)
    phase: Phase | None = Field(None, description="One word for `kubectl get` (display only; conditions are the truth).")
    conditions: list[Condition] | None = Field(
        None,
        description="Compressed, Served and Ready (Ready = Compressed and Served).",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    delta: DeltaStatus | None = Field(None, description="The compressed delta and its fidelity.")
    pool: str | None = Field(None, description="The pool (Ray Serve application) serving this FineTune.", max_length=POOL_NAME_MAX_LENGTH)
    model_name: str | None = Field(None, description="Model name to send in OpenAI requests.", max_length=253)
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL of the pool, e.g. http://<host>:8000/<pool>/v1.", max_length=2048)
    replicas: int | None = Field(None, description="Replicas of the pool holding this FineTune's delta now (a pool loads "
                                 "a tenant on the replicas its requests are routed to).", ge=0)
    job: str | None = Field(None, description="Name of the current (or last) compression Job.", max_length=253)
    retries: int | None = Field(None, description="Failed compression attempts of this generation so far.", ge=0)


class ObjectMeta(_Model):
    """The parts of metadata the operator reads."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="Name of the FineTune.")
    namespace: str | None = Field(None, description="Namespace of the FineTune.")
    generation: int | None = Field(None, description="Generation of the spec.")
    uid: str | None = Field(None, description="UID of the object.")


class FineTune(_Model):
    """A fine-tuned model served as a 1-bit delta over its base (deltafleet.dev/v1alpha1)."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["deltafleet.dev/v1alpha1"] = Field(API_VERSION, description="deltafleet.dev/v1alpha1")
    kind: Literal["FineTune"] = Field(KIND, description="FineTune")
    metadata: ObjectMeta
    spec: FineTuneSpec
    status: FineTuneStatus = Field(default_factory=FineTuneStatus)

    def model_name(self) -> str:
        """The tenant / OpenAI model name: `serving.modelName` or `<namespace>/<name>`."""
        return self.spec.serving.model_name or f"{self.metadata.namespace}/{self.metadata.name}"

    def pool(self) -> str:
        return self.spec.pool_name()
