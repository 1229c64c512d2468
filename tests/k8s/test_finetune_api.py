"""The FineTune pydantic models: defaults, camelCase JSON, and the checks they repeat in
code from the CRD (the operator parses every object with them)."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deltafleet.operator import api

ROOT = Path(__file__).resolve().parents[2]


def body(**spec):
    spec.setdefault("baseModel", {"huggingFace": "meta-llama/Llama-2-7b-hf"})
    spec.setdefault("fineTunedModel", {"path": "finetunes/support"})
    return {"apiVersion": api.API_VERSION, "kind": "FineTune", "metadata": {"name": "bot", "namespace": "team-a", "generation": 2}, "spec": spec}


def test_defaults_match_the_paper_and_round_trip_in_camel_case():
    ft = api.FineTune.model_validate(body())
    c = ft.spec.compression
    assert (c.steps, c.lr, c.batch_size, c.loss, c.calibration.seq_len, c.min_fidelity) == (200, 1e-4, 4, "mse", 128, 0.9)
    assert ft.spec.deletion_policy == "Delete" and ft.spec.backoff_limit == 3
    out = ft.to_k8s()
    assert out["spec"]["compression"]["minFidelity"] == 0.9
    assert "targetOngoingRequests" not in out["spec"]["serving"]  # the pool derives it: 1.5 x its batch size
    assert "min_fidelity" not in str(out)
    assert api.FineTune.model_validate(out) == ft


def test_model_name_and_pool_defaults():
    ft = api.FineTune.model_validate(body())
    assert ft.model_name() == "team-a/bot"
    assert ft.pool() == api.derive_pool(ft.spec.base_model)
    assert ft.pool().startswith("llama-2-7b-hf-")
    other = api.FineTune.model_validate(body(baseModel={"huggingFace": "other/Llama-2-7b-hf"}))
    assert other.pool() != ft.pool(), "two bases must never share a derived pool"
    named = api.FineTune.model_validate(body(serving={"pool": "llama2", "modelName": "support"}))
    assert (named.pool(), named.model_name()) == ("llama2", "support")


def test_model_source_reference():
    hub = api.ModelSource(hugging_face="org/m", revision="v1", token_secret_ref=api.SecretKeyRef(name="hf"))
    assert hub.reference() == "org/m@v1" and hub.token_secret_ref.key == "token"  # the Job pins the revision
    assert api.ModelSource(hugging_face="org/m").reference() == "org/m"
    assert api.ModelSource(path="bases/llama").reference() == "/models/bases/llama"


@pytest.mark.parametrize(
    "source, message",
    [
        ({}, "exactly one of huggingFace or path"),
        ({"huggingFace": "a/b", "path": "x"}, "exactly one of huggingFace or path"),
        ({"path": "x", "revision": "main"}, "apply only to a huggingFace source"),
        ({"path": "../etc"}, "relative path inside the model store"),
        ({"path": "a/../../b"}, "relative path inside the model store"),
        ({"path": "/abs"}, "pattern"),
        ({"huggingFace": "not a repo id"}, "pattern"),
    ],
)
def test_bad_model_sources_are_refused(source, message):
    with pytest.raises(ValidationError, match=message):
        api.FineTune.model_validate(body(baseModel=source))


@pytest.mark.parametrize(
    "spec, where",
    [
        ({"compression": {"steps": -1}}, "compression.steps"),
        ({"compression": {"minFidelity": 1.5}}, "compression.minFidelity"),
        ({"compression": {"loss": "l1"}}, "compression.loss"),
        ({"compression": {"resources": {"requests": {"memory": "lots"}}}}, "compression.resources.requests.memory"),
        ({"serving": {"pool": "Not_A_Label"}}, "serving.pool"),
        ({"serving": {"maxReplicas": 0}}, "serving.maxReplicas"),
        ({"serving": {"modelName": "team:bot"}}, "serving.modelName"),  # the serving app's tenant-name rule
        ({"serving": {"modelName": "team//bot"}}, "serving.modelName"),
        ({"serving": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas (5) must be <= maxReplicas (2)"),
        ({"deletionPolicy": "Orphan"}, "deletionPolicy"),
        ({"modelStore": {"claimName": "a", "hostPath": "/b"}}, "modelStore"),
        ({"surprise": 1}, "surprise"),
        ({"compression": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}}, "compression.tolerations.0"),
    ],
)
def test_bad_fields_are_refused_with_their_location(spec, where):
    with pytest.raises(ValidationError) as err:
        api.FineTune.model_validate(body(**spec))
    assert where in str(err.value)  # the location, in camelCase


def test_status_from_a_compress_result():
    from deltafleet.compress.result import CompressResult, Fidelity, Sizes

    result = CompressResult(
        delta_uri="file:///models/deltas/team-a/bot/g2/delta.safetensors",
        base_model="b",
        finetuned_model="f",
        base_fingerprint="abc",
        sizes=Sizes(delta_bytes=100, finetuned_bytes=1600, compression_ratio=16.0),
        fidelity=Fidelity(
            loss_base=3.0, loss_finetuned=2.0, loss_initial=2.3, loss_delta=2.05, retained_improvement=0.95,
            retained_improvement_initial=0.7, kl=0.01, kl_initial=0.1, eval_tokens=1000,
        ),
        seconds=1.0,
    )
    delta = api.DeltaStatus.from_result(result, generation=2)
    out = api.FineTuneStatus(delta=delta, phase=api.Phase.Serving).to_k8s()
    assert out["phase"] == "Serving"
    assert out["delta"]["compressionRatio"] == 16.0 and out["delta"]["bytes"] == 100
    assert out["delta"]["fidelity"]["retainedImprovement"] == 0.95
    assert out["delta"]["fidelity"]["evalTokens"] == 1000


def test_the_examples_are_valid_finetunes():
    ft = api.FineTune.model_validate(yaml.safe_load((ROOT / "examples/finetune.yaml").read_text()))
    assert ft.spec.serving.pool == "llama2-7b"
    local = api.FineTune.model_validate(yaml.safe_load((ROOT / "examples/finetune-store.yaml").read_text()))
    assert local.spec.base_model.reference() == "/models/bases/tiny-llama"
    assert local.spec.compression.gpus == 0 and local.model_name() == "code-helper"


def test_the_examples_pass_the_default_policy_and_name_their_api_keys():
    from deltafleet.operator.settings import Settings
    from deltafleet.operator.validation import policy_problems

    for example in ("finetune.yaml", "finetune-store.yaml"):
        ft = api.FineTune.model_validate(yaml.safe_load((ROOT / "examples" / example).read_text()))
        assert policy_problems(ft, Settings()) == [], example
        assert ft.spec.serving.api_key_secret_ref is not None, example  # pools need keys by default
