"""What deltafleet can compress and serve: one rule that `deltafleet compress` checks before
any slow work and that the serving replica applies (serving imports it), so a delta compress
accepts is one a replica loads and serves as merged. deltafleet/archsweep.py holds the rule
against every causal-LM architecture transformers ships.
"""

from __future__ import annotations

from torch import nn

from deltafleet.kernels.packing import WORD_BITS

from .linears import block_linears

# Whole tensors a replica keeps per tenant in stacks (norms and the like); larger ones go to its
# slot stacks (embeddings, heads). Serving imports this: the rule below is what a replica applies.
SMALL_PARAM_NUMEL = 1 << 16


def reruns_per_token(mod: nn.Module) -> bool:
    """A module a replica reruns with each token's own parameters (norms, small odd linears):
    a leaf (rerunning it must not rerun delta-aware children) whose parameters are small
    vectors, or a small nn.Linear the kernel cannot pack. Larger or higher-rank parameters
    (expert tensors) have no per-token path."""
    own = list(mod.parameters(recurse=False))
    if not own or any(True for child in mod.children() for _ in child.parameters()):
        return False
    if any(p.numel() > SMALL_PARAM_NUMEL for p in own):
        return False
    return isinstance(mod, nn.Linear) or all(p.dim() <= 1 for p in own)


def unservable_params(model: nn.Module) -> list[tuple[str, str]]:
    """(parameter, module type) of the parameters a serving replica can neither apply as a 1-bit
    delta nor swap per tenant. A replica applies: packable nn.Linear weights (1-bit inside the
    blocks, whole outside) and their biases, nn.Embedding tables, and the parameters of small
    leaf modules (norms: rerun per token). A parameter of anything else (a decoder layer's own
    scalar, a head's loose bias beside its linear) has no per-tenant path."""
    out = []
    for name, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if not own or isinstance(mod, nn.Embedding):
            continue
        if isinstance(mod, nn.Linear) and mod.in_features % WORD_BITS == 0:
            continue
        if reruns_per_token(mod):
            continue
        out += [(f"{name}.{p}" if name else p, type(mod).__name__) for p in own]
    return out


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each decoder layer, as the engine's paged KV cache finds them:
    a `layer_idx` and one head size for K and V (`head_dim`; GPT-NeoX's `head_size`)."""
    return [mod for mod in model.modules()
            if type(mod).__name__.endswith("Attention") and hasattr(mod, "layer_idx")
            and (hasattr(mod, "head_dim") or hasattr(mod, "head_size"))]


MIN_COVERED = 0.75  # share of the non-embedding weights a 1-bit delta must cover to be worth serving


def unsupported_reason(model: nn.Module) -> str | None:
    """Why deltafleet cannot compress and serve this model, in one line; None when it can.

    Needed: attention the serving engine can page (transformers' AttentionInterface and an
    SDPA path, no logit soft-capping); most weights in nn.Linear layers of the blocks (what the
    1-bit kernel computes) — a model whose weights sit mostly elsewhere (MoE expert tensors,
    GPT-2's Conv1D) would be stored nearly whole, and no fleet fits on a GPU that way; and every
    other parameter one a replica can swap per tenant (`unservable_params`). The architecture
    sweep (deltafleet/archsweep.py) checks that what passes here is served exactly as merged."""
    arch = type(model).__name__
    if not type(model).is_backend_compatible():
        return (f"{arch} does not run its attention through transformers' AttentionInterface, which deltafleet's "
                "serving engine needs for its paged KV cache (recurrent and older architectures)")
    if getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
        return f"{arch} soft-caps its attention logits, which deltafleet's paged attention does not do"
    if not getattr(type(model), "_supports_sdpa", False):
        return f"{arch} has no scaled-dot-product attention path, which deltafleet's serving engine uses"
    if not attention_modules(model):
        return (f"{arch}: no attention module with a layer index and one head size for K and V, which deltafleet's "
                "paged KV cache stores (multi-head latent attention and encoder-style layers)")
    try:
        covered_names = set(block_linears(model))
    except ValueError as e:
        return str(e)
    embeddings = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings |= {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    covered, elsewhere = 0, {}
    for name, mod in model.named_modules():
        if id(mod) in embeddings:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if name in covered_names and pname == "weight":
                covered += p.numel()
            else:
                elsewhere[type(mod).__name__] = elsewhere.get(type(mod).__name__, 0) + p.numel()
    total = covered + sum(elsewhere.values())
    if total and covered / total < MIN_COVERED:
        kind, n = max(elsewhere.items(), key=lambda kv: kv[1])
        what = {"Conv1D": "transformers' Conv1D layers (GPT-2 style)"}.get(kind, kind)
        if kind.endswith("Experts"):
            what = f"MoE experts ({kind})"
        return (f"{arch}: {n / total:.0%} of its weights are in {what}, not nn.Linear; deltafleet compresses nn.Linear "
                f"layers at 1 bit and would store the rest whole (needs ≥ {MIN_COVERED:.0%} in nn.Linear)")
    bad = unservable_params(model)
    if bad:
        return (f"{arch}: parameter {bad[0][0]!r} of {bad[0][1]} is neither in an nn.Linear nor a table or norm, so a "
                f"serving replica cannot apply a fine-tune's value of it per tenant ({len(bad)} such parameter{'s' if len(bad) > 1 else ''})")
    return None
