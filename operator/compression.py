"""Compression bookkeeping: which spec fields make a new delta, Job names, backoff and the
quality gate. Pure functions; the handlers call them.

A FineTune's compression *input* is what changes the delta's bytes: the two models, the
compression settings that shape it and the store it is written to. Its hash is recorded on
the FineTune (annotation HASH_ANNOTATION) next to the status it describes, and labels every
Job, so a change of serving settings (a new metadata.generation) never recompresses and a
restarted operator finds the Jobs it made before it died.
"""

from __future__ import annotations

import hashlib
import json

from deltafleet.compress.result import DELTA_FILE
from deltafleet.operator import api

HASH_ANNOTATION = f"{api.GROUP}/compression-hash"
MANAGED_BY = "deltafleet-operator"

# Labels on every compression Job (values fit the 63-char label limit: names are <= 40).
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_FINETUNE = f"{api.GROUP}/finetune"
LABEL_HASH = f"{api.GROUP}/compression-hash"
LABEL_GENERATION = f"{api.GROUP}/generation"
LABEL_ATTEMPT = f"{api.GROUP}/attempt"

# Compression settings that do not change the delta: the gate and where/how the Job runs.
_PLACEMENT = {"min_fidelity", "gpus", "resources", "image", "node_selector", "tolerations"}


def compression_input(spec: api.FineTuneSpec) -> dict:
    def source(m: api.ModelSource) -> dict:
        return {"huggingFace": m.hugging_face, "revision": m.revision, "path": m.path}

    settings = spec.compression.model_dump(mode="json", exclude=_PLACEMENT)
    return {
        "base": source(spec.base_model),
        "finetuned": source(spec.fine_tuned_model),
        "compression": settings,
        "store": spec.model_store.to_k8s() if spec.model_store else None,
    }


def compression_hash(spec: api.FineTuneSpec) -> str:
    text = json.dumps(compression_input(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_name(finetune: str, generation: int, attempt: int) -> str:
    """`<ft>-compress-g<gen>` for the first attempt, `-r<n>` for the n-th retry: deterministic,
    so creating it twice is a 409, never a second Job."""
    name = f"{finetune}-compress-g{generation}"
    return name if attempt == 0 else f"{name}-r{attempt}"


def base_store_dir(root: str = api.MODEL_STORE_MOUNT) -> str:
    """Where Jobs keep Hub bases (compress --base-store: `<org>--<name>/<commit>/` below it)."""
    return f"{root}/bases/hub"


def deltas_dir(namespace: str, name: str, root: str = api.MODEL_STORE_MOUNT) -> str:
    """A FineTune's folder of deltas (one `g<gen>` per compressed generation) under a store root."""
    return f"{root}/deltas/{namespace}/{name}"


def delete_deltas(namespace: str, name: str, root: str) -> bool:
    """Remove a FineTune's deltas folder under a store root; False when there was none. Needs
    write access to what Jobs wrote: the operator is in the store's group and Jobs write
    group-writable files (compress sets umask 002)."""
    import shutil
    from pathlib import Path

    folder = Path(deltas_dir(namespace, name, root=root))
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True


def output_dir(namespace: str, name: str, generation: int, root: str = api.MODEL_STORE_MOUNT) -> str:
    """Where a generation's delta is written; by default as the Job (and the contract) sees the store."""
    return f"{deltas_dir(namespace, name, root)}/g{generation}"


def delta_uri(namespace: str, name: str, generation: int) -> str:
    return f"file://{output_dir(namespace, name, generation)}/{DELTA_FILE}"


def retry_delay(failures: int, base: float, cap: float) -> float:
    """Exponential backoff before attempt `failures` (1 -> base, 2 -> 2*base, ...), capped."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (failures - 1))


def passes_gate(fidelity: float, min_fidelity: float) -> bool:
    return fidelity >= min_fidelity
