"""Load a pool's base model (any decoder-only transformers model whose linears are nn.Linear)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltafleet.compress.modelref import split_revision

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this replica")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 where the hardware does it well, fp32 on CPU (correct, not fast)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda" and dtype == "float32":  # refused before the base is loaded, not at the first request
        raise ValueError("dtype float32 on CUDA is not served (the delta kernels take fp16/bf16 activations): "
                         "use bfloat16 or float16")
    return DTYPES[dtype]


def load_base(base_model: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer), model in eval mode on `device`; attention via SDPA. `id@rev` pins a Hub revision."""
    name, revision = split_revision(base_model)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype, attn_implementation="sdpa")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"base model {base_model!r} is encoder-decoder; only decoder-only models are served")
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
