"""BitDelta on both toy families: the figures the issue asks for, measured, on held-out code."""

import json

import pytest
import torch
import torch.nn.functional as F

from deltafleet.compress.api import load_model
from deltafleet.compress.apply import DeltaLinear, attach_delta
from deltafleet.compress.checkpoint import Checkpoint
from deltafleet.compress.fingerprint import fingerprint_model
from deltafleet.compress.format import load_delta
from deltafleet.compress.result import CompressResult
from deltafleet.compress.stage1 import extract
from deltafleet.compress.svd import evaluate_low_rank
from deltafleet.kernels.reference import delta_linear_reference, dense_delta_weight

CPU = torch.device("cpu")


def test_result_file_and_metadata(compressed):
    on_disk = CompressResult.model_validate_json((compressed.out / "result.json").read_text())
    assert on_disk == compressed.result
    delta = load_delta(compressed.out / "delta.safetensors")
    assert delta.fidelity == compressed.result.fidelity.model_dump()
    assert delta.base_fingerprint == compressed.result.base_fingerprint
    assert on_disk.sizes.delta_bytes == (compressed.out / "delta.safetensors").stat().st_size
    assert on_disk.sizes.compression_ratio > 1
    assert len(on_disk.termination_message()) <= 4096
    print(compressed.family, json.dumps(on_disk.fidelity.model_dump(), indent=1))


def test_finetune_differs_from_base_on_its_domain(compressed):
    f = compressed.result.fidelity
    assert f.loss_base - f.loss_finetuned > 0.3  # nats/token on held-out stdlib code


def test_distilled_bitdelta_keeps_the_improvement(compressed):
    f = compressed.result.fidelity
    assert f.retained_improvement >= 0.9
    # Distillation fits the compressed model to the fine-tune's logits: the KL must drop. Its eval
    # loss moves toward the fine-tune's, which is not always down: with torch 2.15 the toy qwen2
    # pair's stage 1 scores 4.219, *below* its own fine-tune's 4.230, and distillation brings it
    # to 4.250 while the KL falls 0.041 -> 0.008.
    assert f.kl < 0.5 * f.kl_initial
    # greedy text follows the argmax: the delta agrees with the fine-tune's next token more than the base
    assert f.top1_agreement_base < f.top1_agreement <= 1.0
    assert f.loss_finetuned <= f.loss_delta < f.loss_base


def test_beats_low_rank_baseline_at_same_bytes(compressed, eval_samples):
    delta = load_delta(compressed.out / "delta.safetensors")
    stats, nbytes = evaluate_low_rank(str(compressed.base), str(compressed.finetuned), delta, eval_samples, 4)
    sign_and_scale_bytes = sum(p.numel() * 4 for p in delta.signs.values()) + sum(s.numel() * 4 for s in delta.scales.values())
    assert nbytes <= sign_and_scale_bytes
    f = compressed.result.fidelity
    print(f"{compressed.family}: svd loss {stats.loss:.4f} kl {stats.kl:.4f} vs bitdelta {f.loss_delta:.4f} kl {f.kl:.4f}")
    assert f.loss_delta < stats.loss
    assert f.kl < stats.kl


def _logit_mse(model, teacher, samples) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(model(input_ids=s[None]).logits, teacher(input_ids=s[None]).logits).item() for s in samples) / len(samples)


def test_distillation_lowers_logit_mse(compressed, eval_samples):
    teacher = load_model(compressed.finetuned, CPU, torch.float32)
    stage1 = extract(Checkpoint(str(compressed.base)), Checkpoint(str(compressed.finetuned)))
    distilled = load_delta(compressed.out / "delta.safetensors")
    mse = {}
    for name, delta in (("stage1", stage1), ("distilled", distilled)):
        model = load_model(compressed.base, CPU, torch.float32)
        attach_delta(model, delta)
        mse[name] = _logit_mse(model, teacher, eval_samples[:8])
    print(compressed.family, mse)
    assert mse["distilled"] < mse["stage1"]
    assert set(stage1.signs) == set(distilled.signs)
    assert all(torch.equal(stage1.signs[n], distilled.signs[n]) for n in stage1.signs)  # stage 2 trains scales only


def test_reference_equals_dense_merged_weight(compressed):
    delta = load_delta(compressed.out / "delta.safetensors")
    base = Checkpoint(str(compressed.base))
    torch.manual_seed(0)
    for name in list(delta.signs)[:7]:  # one block's worth of matrices
        w = base.get(f"{name}.weight").float()
        x = torch.randn(5, w.shape[1])
        packed, scale = delta.signs[name], delta.scales[name]
        dense = x @ dense_delta_weight(w, packed, scale).t()
        ref = delta_linear_reference(x, w, packed[None], scale[None], torch.zeros(5, dtype=torch.long))
        torch.testing.assert_close(ref, dense, rtol=1e-5, atol=1e-5)
        base_rows = delta_linear_reference(x, w, packed[None], scale[None], torch.full((5,), -1))
        torch.testing.assert_close(base_rows, x @ w.t(), rtol=1e-5, atol=1e-5)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        torch.testing.assert_close(DeltaLinear(lin, packed, scale)(x), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_fingerprint_matches_loaded_model(compressed, dtype):
    model = load_model(compressed.base, CPU, dtype)
    assert fingerprint_model(model) == compressed.result.base_fingerprint
    assert fingerprint_model(load_model(compressed.finetuned, CPU, dtype)) != compressed.result.base_fingerprint


def test_options_and_self_generated_calibration(tmp_path):
    """Per-row scales, 1-bit embeddings, and calibration sampled from the fine-tune (no data given).
    Architecture-independent code paths: run on one family to keep the suite fast."""
    from deltafleet.compress import CompressSettings, compress
    from deltafleet.toymodels import toy_pair

    pair = toy_pair("llama")
    settings = CompressSettings(steps=4, lr=1e-3, batch_size=4, seq_len=32, samples=8, eval_samples=4,
                                scale_per_row=True, compress_embeddings=True, loss="kl")
    result = compress(str(pair[0]), str(pair[1]), tmp_path, settings)
    delta = load_delta(tmp_path / "delta.safetensors")
    assert {"model.embed_tokens", "lm_head"} <= set(delta.signs)
    assert "model.embed_tokens.weight" not in delta.whole and "lm_head.weight" not in delta.whole
    for name, scale in delta.scales.items():
        assert scale.shape == (delta.signs[name].shape[0],)
    assert result.fidelity.eval_tokens == 4 * 31
    assert result.sizes.delta_bytes < (pair[1] / "model.safetensors").stat().st_size / 10
