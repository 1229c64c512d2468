"""Per-token norm weights: the module's own forward with broadcast weights where that is exact,
vmap over functional_call where it is not — both equal to running each row with its tenant's weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from deltafleet.serving.layers import BatchContext, add_norm_hook


@pytest.mark.parametrize("make,path", [(lambda: LlamaRMSNorm(8), "broadcast"), (lambda: GemmaRMSNorm(8), "broadcast"),
                                       (lambda: nn.LayerNorm(8), "vmap")], ids=["llama-rmsnorm", "gemma-rmsnorm", "layernorm"])
def test_each_token_is_normed_with_its_tenants_weights(make, path):
    torch.manual_seed(0)
    mod = make()
    params = dict(mod.named_parameters())
    stacks = {p: torch.randn(3, *t.shape) for p, t in params.items()}  # row 0: the base's, rows 1-2: slots 0-1
    with torch.no_grad():
        for p, t in params.items():
            t.copy_(stacks[p][0])
    x = torch.randn(3, 5, 8)
    slots = [0, -1, 1]
    with torch.no_grad():  # each row alone with its tenant's weights, before the hook exists
        want = torch.cat([torch.func.functional_call(mod, {p: t[s + 1] for p, t in stacks.items()}, (x[i : i + 1],))
                          for i, s in enumerate(slots)])
    bank = SimpleNamespace(param_stacks={"norm": stacks}, slot_overrides=[{"norm"}, {"norm"}], n_slots=2)
    ctx = BatchContext(bank)
    add_norm_hook(mod, "norm", ctx)
    ctx.set(slots, torch.device("cpu"))
    for _ in range(2):  # the first call decides the path, the second takes it
        with torch.no_grad():
            got = mod(x)  # [3, 5, 8]
        exact = path == "broadcast"  # vmap batches the reduction: equal to an ulp
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    assert mod.deltafleet_norm_path == path
