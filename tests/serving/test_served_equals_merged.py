"""Served = measured: a tenant as the engine serves it computes what `deltafleet merge`'s
checkpoint computes, for every toy family and every delta option — greedy text through the
engine, and eval loss through the served layers, bank and kernels (teacher-forced).

Families: llama; qwen2 (q/k/v biases: the fine-tune's bias plus the 1-bit term); mistral;
gemma (tied embeddings stored whole, its (1 + w) RMSNorm, embeddings scaled in the module);
gpt_neox (Pythia: fused query_key_value with biases, LayerNorm with bias, parallel residual,
checkpoint keys that transformers renames on load).
Options: one scale per matrix (the paper), one per output row, 1-bit embeddings and lm_head.
"""

from __future__ import annotations

import pytest
import torch

from deltafleet.compress.fidelity import evaluate
from deltafleet.compress.format import load_delta
from deltafleet.compress.merge_cli import merge
from deltafleet.serving.engine import Engine
from deltafleet.serving.sampling import SamplingParams
from deltafleet.serving.served import TenantScorer, build_served_model
from deltafleet.toymodels import FAMILIES, toy_delta, toy_pair

pytestmark = pytest.mark.slow

OPTIONS = {
    "per-matrix": {},
    "per-row": {"scale_per_row": True},
    "1-bit-embeddings": {"compress_embeddings": True},
}
# Fast stage 2: what is under test is serving the delta, not how good the delta is.
FAST = dict(steps=4, samples=16, eval_samples=8)
PROMPTS = ["def main(argv):\n    ", "The class is"]
GREEDY = SamplingParams(max_tokens=16, temperature=0)
# Each family's input embedding and final norm, as the loaded model names them.
EMBEDDINGS = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "mistral": "model.embed_tokens",
              "gemma": "model.embed_tokens", "gpt_neox": "gpt_neox.embed_in"}
FINAL_NORMS = {**{f: "model.norm" for f in EMBEDDINGS}, "gpt_neox": "gpt_neox.final_layer_norm"}


@pytest.fixture(scope="module", params=[(f, o) for f in FAMILIES for o in OPTIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    family, option = request.param
    base, _ = toy_pair(family)
    delta = toy_delta(family, **FAST, **OPTIONS[option])
    merged = merge(str(base), str(delta), tmp_path_factory.mktemp(f"merged-{family}-{option}"), dtype="float32")
    return family, option, base, delta, merged


def test_the_delta_holds_what_the_option_says(case):
    family, option, base, delta_path, _ = case
    delta = load_delta(delta_path)
    assert delta.signs, "no 1-bit linears"
    if option == "per-row":
        assert all(s.dim() == 1 for s in delta.scales.values())
    if family == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in delta.whole), "qwen2's fine-tuned biases are stored whole"
    embed = EMBEDDINGS[family]
    if option == "1-bit-embeddings" and family != "gemma":  # gemma ties them: stored whole instead
        assert embed in delta.signs and "lm_head" in delta.signs
    if family == "gemma":
        assert f"{embed}.weight" in delta.whole
    if family == "gpt_neox":  # fused qkv at 1 bit, its bias and the LayerNorms' biases whole
        assert "gpt_neox.layers.0.attention.query_key_value" in delta.signs
        assert {"gpt_neox.layers.0.attention.query_key_value.bias", "gpt_neox.final_layer_norm.bias"} <= set(delta.whole)


def test_served_greedy_text_equals_the_merged_checkpoint(case, reference_greedy):
    family, option, base, delta, merged = case
    engine = Engine(str(base), device="cpu", dtype="float32", max_batch_size=4)
    try:
        engine.set_tenants({"t": delta})
        assert engine.wait_ready() == {"t": "ready"}
        # norms are served from per-slot stacks (one vectorized call), not per-slot tensors
        assert FINAL_NORMS[family] in engine.bank.param_stacks
        for prompt in PROMPTS:
            ids = engine.encode(prompt)
            got = [t for ev in engine.submit("t", prompt, GREEDY) for t in ev.token_ids]
            assert got == reference_greedy(merged, ids, GREEDY.max_tokens), f"{family}/{option}: {prompt!r}"
        slot = engine.bank.status("t").slot
        assert engine.bank.slot_overrides[slot], "the fine-tune changed its norms: the stacks are in use"
    finally:
        engine.close()


def test_served_eval_loss_equals_the_merged_checkpoint(case):
    from transformers import AutoModelForCausalLM

    from deltafleet.compress.api import load_tokenizer
    from deltafleet.compress.calibration import pick, windows_from_text
    from deltafleet.toymodels import toy_eval_text

    family, option, base, delta, merged = case
    tok = load_tokenizer(base)
    samples = pick(windows_from_text(str(toy_eval_text(family)), tok, 64), 8, 0)  # [8, 64]
    served = TenantScorer(build_served_model(str(base), device="cpu", dtype="float32"), "t", delta)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    stats = evaluate(served, merged_model, samples, batch_size=4)  # loss: served; teacher_loss: merged
    assert abs(stats.loss - stats.teacher_loss) <= 1e-4 * stats.teacher_loss, (family, option, stats)
    assert stats.kl < 1e-5
    # ... and the check has teeth: the tenant is measurably not the base
    assert abs(evaluate(base_model, merged_model, samples, batch_size=4).loss - stats.teacher_loss) > 1e-3


def _perturbed(delta_path, out_path, seed: int):
    """Another tenant of the same base: the delta's whole tensors moved by noise, so its
    embedding table / head / norms differ from the first tenant's (a row served from the
    wrong slot-stack entry or stack row would show)."""
    from deltafleet.compress.format import save_delta

    delta = load_delta(delta_path)
    g = torch.Generator().manual_seed(seed)
    delta.whole = {n: t + 0.05 * t.float().std() * torch.randn(t.shape, generator=g).to(t.dtype) for n, t in delta.whole.items()}
    delta.scales = {n: s * 1.5 for n, s in delta.scales.items()}
    return save_delta(delta, out_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_mixing_tenants_and_the_base_serves_each_row_as_its_own_merged_checkpoint(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = toy_pair(family)
    deltas = {"a": toy_delta(family, **FAST), "b": _perturbed(toy_delta(family, **FAST), tmp_path / "b.safetensors", 1)}
    if family != "gemma":  # gemma ties its embeddings: they are stored whole, never 1-bit
        deltas["e"] = toy_delta(family, **FAST, compress_embeddings=True)
    served = build_served_model(str(base), device="cpu", dtype="float32")
    slots = {name: TenantScorer(served, name, path).slot for name, path in deltas.items()}
    refs = {name: AutoModelForCausalLM.from_pretrained(merge(str(base), str(p), tmp_path / name, dtype="float32"),
                                                       dtype=torch.float32).eval() for name, p in deltas.items()}
    refs["base"] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    slots["base"] = -1

    rows = ["a", "base", "b", "a", *(["e"] if "e" in deltas else []), "b"]
    ids = torch.randint(3, served.model.config.vocab_size, (len(rows), 24), generator=torch.Generator().manual_seed(0))
    served.ctx.set([slots[r] for r in rows], served.device)
    with torch.inference_mode():
        got = served.model(input_ids=ids, use_cache=False).logits  # [rows, 24, V]
        for i, r in enumerate(rows):
            want = refs[r](input_ids=ids[i : i + 1]).logits[0]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{family} row {i} ({r}): {m}")
        # the tenants really differ from each other and from the base
        assert (refs["a"](input_ids=ids[:1]).logits - refs["b"](input_ids=ids[:1]).logits).abs().max() > 1e-2
    # the large whole tensors came from the slot stacks (one entry per tenant), not per-slot tensors
    stack = served.bank.whole_stacks[EMBEDDINGS[family]]
    assert {slots["a"], slots["b"]} <= stack.slots
    if "e" in deltas:
        assert served.bank.embed_stacks[EMBEDDINGS[family]].slots == {slots["e"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_of_a_supported_family_is_served_without_a_loop_over_slots(family):
    from deltafleet.serving.layers import BatchedDeltaLinear, embedding_supports_1bit

    served = build_served_model(str(toy_pair(family)[0]), device="cpu", dtype="float32")
    for name, mod in served.model.named_modules():
        if isinstance(mod, BatchedDeltaLinear) or embedding_supports_1bit(mod) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        assert name in served.bank.param_stacks, f"{family}: {name} ({type(mod).__name__}) would be served per slot"
    if family == "gemma":  # tied: the table and the head share one slot stack
        assert served.bank.whole_stacks["model.embed_tokens"] is served.bank.whole_stacks["lm_head"]
