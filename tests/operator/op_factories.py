"""FineTune objects for the operator's tests (as the API server would return them)."""

from __future__ import annotations

import copy

from deltafleet.operator import api


def finetune_body(name: str = "support-bot", namespace: str = "team-a", *, base: str = "bases/tiny", finetuned: str | None = None,
                  generation: int = 1, spec: dict | None = None, status: dict | None = None, annotations: dict | None = None,
                  created: str = "2026-01-01T00:00:00Z") -> dict:
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "generation": generation,
            "creationTimestamp": created,
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "baseModel": {"path": base},
            "fineTunedModel": {"path": finetuned or f"finetunes/{name}"},
            "compression": {"steps": 2, "minFidelity": 0.5, "gpus": 0},
            "serving": {},
        },
    }
    for k, v in (spec or {}).items():
        body["spec"][k] = {**body["spec"].get(k, {}), **v} if isinstance(v, dict) else v
    if status is not None:
        body["status"] = copy.deepcopy(status)
    return body


def delta_status(uri: str = "file:///models/deltas/team-a/support-bot/g1/delta.safetensors", fidelity: float = 0.95) -> dict:
    return {
        "uri": uri,
        "bytes": 1000,
        "finetunedBytes": 16000,
        "compressionRatio": 16.0,
        "generation": 1,
        "fidelity": {"retainedImprovement": fidelity},
    }


def finetune(**kw) -> api.FineTune:
    return api.FineTune.model_validate(finetune_body(**kw))


def compress_result(uri: str = "file:///models/deltas/a/b/g1/delta.safetensors", retained: float = 0.9):
    """A Job's CompressResult (what `deltafleet compress` writes to its termination message)."""
    from deltafleet.compress.result import CompressResult

    return CompressResult.model_validate({
        "delta_uri": uri, "base_model": "b", "finetuned_model": "f", "base_fingerprint": "abc", "seconds": 1.5,
        "sizes": {"delta_bytes": 10, "finetuned_bytes": 160, "compression_ratio": 16.0},
        "fidelity": {"loss_base": 3, "loss_finetuned": 2, "loss_initial": 2.5, "loss_delta": 2.1, "retained_improvement": retained,
                     "retained_improvement_initial": 0.5, "kl": 0.01, "kl_initial": 0.1, "eval_tokens": 100},
    })
