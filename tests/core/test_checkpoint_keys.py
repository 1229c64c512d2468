"""Checkpoint keys are read as transformers maps them on load (issue: GPT-NeoX refused since
transformers 5), and what cannot be compressed and served is refused before any slow work."""

from __future__ import annotations

import pytest
import torch

from deltafleet.compress.checkpoint import Checkpoint, InputError, checkpoint_keys, empty_model
from deltafleet.compress.support import unservable_params, unsupported_reason


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def _tiny(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config_cls(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=128, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_a_gpt_neox_checkpoint_names_its_head_embed_out_and_the_model_lm_head(tmp_path):
    from safetensors import safe_open
    from transformers import GPTNeoXConfig

    model = _tiny(GPTNeoXConfig)
    ck = Checkpoint(str(_save(model, tmp_path / "neox")))
    assert "embed_out.weight" in ck.names() and "lm_head.weight" not in ck.names()  # the file keeps the old key
    keys = ck.model_keys()
    assert keys["lm_head.weight"] == "embed_out.weight"
    assert keys["gpt_neox.embed_in.weight"] == "gpt_neox.embed_in.weight"
    assert set(keys) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(ck.param("lm_head.weight"), model.lm_head.weight, rtol=0, atol=0)
    with safe_open(str(tmp_path / "neox" / "model.safetensors"), "pt") as f:  # really the file's tensor, by its old key
        assert torch.equal(ck.param("lm_head.weight"), f.get_tensor("embed_out.weight"))


def test_a_causal_lm_reads_a_checkpoint_saved_without_its_base_model_prefix(tmp_path):
    from transformers import LlamaConfig

    model = _tiny(LlamaConfig, num_key_value_heads=2)
    keys = checkpoint_keys(empty_model_of(model), [n.removeprefix("model.") for n, _ in model.named_parameters()], "x")
    assert keys["model.layers.0.self_attn.q_proj.weight"] == "layers.0.self_attn.q_proj.weight"
    assert keys["lm_head.weight"] == "lm_head.weight"


def empty_model_of(model):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def test_a_key_transformers_converts_rather_than_renames_is_refused_naming_it():
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=320, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, num_local_experts=2)
    model = empty_model_of(type("M", (), {"config": cfg}))
    per_expert = [f"model.layers.0.mlp.experts.{e}.{w}.weight" for e in range(2) for w in ("w1", "w2", "w3")]
    with pytest.raises(InputError, match=r"converts checkpoint tensor 'model\.layers\.0\.mlp\.experts\.0\.w1\.weight'.*"
                                         r"MergeModulelist"):
        checkpoint_keys(model, per_expert, "base /m")


@pytest.mark.parametrize(("config", "reason"), [
    ("GPT2Config", "Conv1D"),
    ("MixtralConfig", "MoE experts"),
    ("MambaConfig", "AttentionInterface"),
])
def test_what_deltafleet_cannot_serve_is_named_in_one_line(config, reason):
    import transformers

    cfg = getattr(transformers, config)()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    why = unsupported_reason(model)
    assert why and reason in why and "\n" not in why


def test_a_parameter_no_replica_can_swap_per_tenant_is_found():
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=320, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                     is_decoder=True)
    model = empty_model_of(type("M", (), {"config": cfg}))
    assert unservable_params(model) == [("cls.predictions.bias", "BertLMPredictionHead")]
    assert unsupported_reason(model)  # refused (its encoder-style attention is named first)


def test_the_supported_families_have_nothing_unservable(pair):
    model = empty_model(pair[0])
    assert unservable_params(model) == [] and unsupported_reason(model) is None


def test_a_finetune_holding_nan_is_refused_naming_the_tensor(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltafleet.compress.stage1 import extract

    ft = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32)
    with torch.no_grad():
        ft.model.norm.weight[3] = float("nan")
    ft.save_pretrained(tmp_path / "ft")
    with pytest.raises(InputError, match=r"fine-tune .*'model\.norm\.weight' holds NaN"):
        extract(Checkpoint(str(pair[0])), Checkpoint(str(tmp_path / "ft")))
