"""A tiny random Llama base, three 'fine-tunes' (base + noise, some with whole tensors) and
their 1-bit deltas, written with the real delta format, plus each fine-tune merged back to a
dense HF checkpoint (W_base + α·sign, via kernels.dense_delta_weight) as the ground truth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltafleet.compress.fingerprint import fingerprint_model
from deltafleet.compress.format import Delta, save_delta
from deltafleet.kernels import dense_delta_weight, pack_signs

TEXT = (
    "The quick brown fox jumps over the lazy dog. Serving many fine-tuned models from one base "
    "saves memory: each fine-tune is a one-bit delta. def add(a, b):\n    return a + b\n"
) * 20

# Which parameters each tenant stores whole (besides its 1-bit block linears), and scale kind.
TENANTS = {
    "team-a/alpha": dict(whole=["model.norm.weight", "model.embed_tokens.weight"], per_row=False),
    "team-a/beta": dict(whole=["lm_head.weight", "model.layers.0.input_layernorm.weight"], per_row=True),
    "team-b/gamma": dict(whole=[], per_row=False),
}


def _tokenizer():
    from deltafleet.toymodels import train_tokenizer

    return train_tokenizer(320, [TEXT])


def _base_model(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def make_delta(base: LlamaForCausalLM, seed: int, whole: list[str], per_row: bool, fingerprint: str, name: str):
    """(Delta, merged model state): a 1-bit delta of base+noise and the exact model it stands for."""
    g = torch.Generator().manual_seed(seed)
    merged = {k: v.clone() for k, v in base.state_dict().items()}
    delta = Delta(base_model="toy-base", base_fingerprint=fingerprint, finetuned_model=name)
    for mname, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and mname.startswith("model.layers."):
            d = torch.randn(mod.weight.shape, generator=g) * 0.05
            packed = pack_signs(d)
            scale = d.abs().mean(1) if per_row else d.abs().mean()
            delta.signs[mname], delta.scales[mname] = packed, scale.float()
            merged[mname + ".weight"] = dense_delta_weight(mod.weight, packed, scale)
    for p in whole:
        t = merged[p] + torch.randn(merged[p].shape, generator=g) * 0.1
        delta.whole[p] = t
        merged[p] = t
    return delta, merged


class Toy:
    def __init__(self, root: Path) -> None:
        tok = _tokenizer()
        base = _base_model(tok, 0)
        self.base_dir = root / "base"
        base.save_pretrained(self.base_dir, safe_serialization=True)
        tok.save_pretrained(self.base_dir)
        fp = fingerprint_model(LlamaForCausalLM.from_pretrained(self.base_dir))
        self.deltas: dict[str, Path] = {}
        self.merged_dirs: dict[str, Path] = {}
        for i, (name, spec) in enumerate(TENANTS.items()):
            delta, merged = make_delta(base, 100 + i, spec["whole"], spec["per_row"], fp, name)
            safe = name.replace("/", "__")
            self.deltas[name] = save_delta(delta, root / "deltas" / safe / "delta.safetensors")
            m = _base_model(tok, 0)
            m.load_state_dict(merged)
            m.save_pretrained(root / "merged" / safe, safe_serialization=True)
            tok.save_pretrained(root / "merged" / safe)
            self.merged_dirs[name] = root / "merged" / safe
        # A delta built against a different base (same shapes, other weights).
        other = _base_model(tok, 7)
        wrong, _ = make_delta(other, 200, [], False, fingerprint_model(other), "other/ft")
        self.wrong_base = save_delta(wrong, root / "deltas" / "wrong" / "delta.safetensors")
        # A corrupt copy of a good delta: flip bytes in the tensor data.
        raw = bytearray(self.deltas["team-b/gamma"].read_bytes())
        for i in range(len(raw) - 200, len(raw) - 100):
            raw[i] ^= 0x5A
        self.corrupt = root / "deltas" / "corrupt" / "delta.safetensors"
        self.corrupt.parent.mkdir(parents=True)
        self.corrupt.write_bytes(bytes(raw))
        self.tokenizer = tok


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Toy:
    return Toy(tmp_path_factory.mktemp("serving-toy"))


@pytest.fixture(scope="session")
def reference_greedy():
    return _reference_greedy


def _reference_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What the merged fine-tune generates alone (greedy), stopping at EOS like the engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False, pad_token_id=model.config.pad_token_id,
        )
    ids = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids
