"""Which modules BitDelta compresses, found by module type and shape, not by architecture names.

The transformer blocks are the model's largest `nn.ModuleList` whose children all share one
class (Llama's `model.layers`, GPT-2's `transformer.h`, ...). Every `nn.Linear` inside them
whose in_features is a multiple of 32 (the packing word) gets a 1-bit delta. With the
embeddings option, the input embedding and the output head join them when they are not tied.
"""

from __future__ import annotations

from torch import nn

from deltafleet.kernels.packing import WORD_BITS


def block_lists(model: nn.Module, linear: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Names of the ModuleList(s) of transformer blocks: the largest homogeneous list(s) with
    linear layers (`linear`: the types that count; serving adds its delta-aware linear)."""
    best: list[tuple[int, str]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        if not any(isinstance(m, linear) for m in mod.modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        best.append((size, name))
    if not best:
        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        if conv1d:  # GPT-2 style: transformers' Conv1D stores weights transposed, not as nn.Linear
            raise ValueError(f"{type(model).__name__} uses transformers' Conv1D layers (GPT-2 style), which deltafleet "
                             "does not compress; supported: models whose blocks use nn.Linear (Llama, Mistral, Qwen2, Gemma, ...)")
        raise ValueError(f"{type(model).__name__}: found no list of transformer blocks containing nn.Linear layers")
    best.sort(reverse=True)
    return [best[0][1]]


def block_linears(model: nn.Module) -> list[str]:
    """Module names of every packable nn.Linear inside the transformer blocks, in model order."""
    prefixes = tuple(f"{name}." for name in block_lists(model))
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.startswith(prefixes) and mod.in_features % WORD_BITS == 0
    ]


def embedding_modules(model: nn.Module) -> list[str]:
    """Input embedding and output head, when untied and packable (the --compress-embeddings option)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        return []  # tied: one matrix serves both; it stays whole (a 1-bit copy would change both roles)
    by_id = {id(m): name for name, m in model.named_modules()}
    out = []
    for mod in (emb, head):
        if mod is not None and mod.weight.shape[1] % WORD_BITS == 0 and id(mod) in by_id:
            out.append(by_id[id(mod)])
    return out


def compressed_modules(model: nn.Module, compress_embeddings: bool = False) -> list[str]:
    names = block_linears(model)
    return names + embedding_modules(model) if compress_embeddings else names
