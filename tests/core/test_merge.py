"""`deltafleet merge` writes a checkpoint that generates exactly what base + delta generates."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltafleet.cli import main
from deltafleet.compress.api import load_model
from deltafleet.compress.apply import attach_delta
from deltafleet.compress.format import load_delta

PROMPTS = ["def read_config(path):\n", "import os\n\nclass", "The for statement"]


def greedy(model, tok, prompt: str, n: int = 24) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_merged_checkpoint_generates_like_base_plus_delta(compressed, tmp_path, capsys):
    delta_path = compressed.out / "delta.safetensors"
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(compressed.base), "--delta", str(delta_path), "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)  # copied from the base
    live = load_model(compressed.base, torch.device("cpu"), torch.float32)
    attach_delta(live, load_delta(delta_path))
    finetuned = load_model(compressed.finetuned, torch.device("cpu"), torch.float32)
    base = load_model(compressed.base, torch.device("cpu"), torch.float32)

    differs_from_base = False
    for prompt in PROMPTS:
        tokens = greedy(merged, tok, prompt)
        assert tokens == greedy(live, tok, prompt), prompt
        differs_from_base |= tokens != greedy(base, tok, prompt)
        print(f"{compressed.family} {prompt!r}\n  delta: {tok.decode(tokens)!r}\n  ft:    {tok.decode(greedy(finetuned, tok, prompt))!r}")
    assert differs_from_base  # the delta really changes what the base says

    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, live(ids).logits, rtol=1e-4, atol=1e-4)
