"""What a compression Job reports: written to `result.json` and (compact) to the pod's
termination message, read by the operator. Pure pydantic: the operator imports this
module without torch, so keep it free of ML imports.

It also owns the names of the two files a Job leaves in its output folder: compress writes
them (through compress/files.py `write_atomic`), the operator builds their paths and URIs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

RESULT_FILE = "result.json"  # this module's CompressResult, the operator's fallback to the termination message
DELTA_FILE = "delta.safetensors"  # compress/format.py's delta file


class Fidelity(BaseModel):
    """Eval losses on held-out text of the fine-tune's domain, and what the delta keeps."""

    model_config = ConfigDict(extra="forbid")

    loss_base: float
    loss_finetuned: float
    loss_initial: float = Field(description="BitDelta after stage 1 (signs + mean|Δ| scales)")
    loss_delta: float = Field(description="BitDelta after scale distillation")
    retained_improvement: float = Field(description="(L_base - L_delta) / (L_base - L_ft)")
    retained_improvement_initial: float
    kl: float = Field(description="mean per-token KL(fine-tune || delta)")
    kl_initial: float
    eval_tokens: int
    # Greedy text follows the argmax: share of held-out positions where it equals the fine-tune's.
    top1_agreement_base: float | None = Field(None, description="the base's top-1 agreement with the fine-tune")
    top1_agreement: float | None = Field(None, description="base + delta's top-1 agreement with the fine-tune")


class Sizes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta_bytes: int = Field(description="size of delta.safetensors on disk")
    finetuned_bytes: int = Field(description="bytes of the fine-tune's parameters at its dtype")
    compression_ratio: float = Field(description="finetuned_bytes / delta_bytes")


class CompressResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta_uri: str
    base_model: str
    finetuned_model: str
    base_fingerprint: str
    # The base's folder in the model store when it came from the Hub (compress --base-store):
    # the exact snapshot the delta was made against, which serving replicas load.
    base_snapshot: str | None = None
    sizes: Sizes
    fidelity: Fidelity
    seconds: float

    def termination_message(self) -> str:
        """Compact JSON for the pod's termination message (Kubernetes keeps at most 4096 bytes)."""
        text = self.model_dump_json()
        if len(text.encode()) > 4096:
            raise ValueError(f"result is {len(text.encode())} bytes; a termination message holds 4096")
        return text
