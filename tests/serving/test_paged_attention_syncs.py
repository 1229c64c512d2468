"""Paged attention of a mixed step (decode rows + a prefill chunk) reads no device value on the
host (issue: GPU figures on the first try, point 3 — `o[g.valid]` synced once per layer), and
still computes causal attention over each sequence's own blocks."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from deltafleet.serving.paged_kv import PagedKVCache, PagedContext, StepLayout, paged_attention
from graph_safety import NoHostSync

BS, H, D = 4, 2, 8


def test_a_mixed_step_attends_without_host_syncs_and_matches_sdpa_over_each_sequence():
    torch.manual_seed(0)
    cache = PagedKVCache(1, 16, BS, H, D, torch.float32, torch.device("cpu"))
    # sequence A: 5 tokens cached, decodes 1; sequence B: a fresh prompt of 6 tokens, prefilled at once
    ctx_a = (torch.randn(5, H, D), torch.randn(5, H, D))
    blocks_a, blocks_b = [0, 1], [2, 3]
    for i in range(5):
        pos = blocks_a[i // BS] * BS + i % BS
        cache.k[0, pos], cache.v[0, pos] = ctx_a[0][i], ctx_a[1][i]
    layout = StepLayout.build([(blocks_a, 5, 1), (blocks_b, 0, 6)], BS, torch.device("cpu"))
    module = SimpleNamespace(layer_idx=0, deltafleet_paged=PagedContext(cache))
    module.deltafleet_paged.layout = layout
    q, k, v = (torch.randn(1, H, 7, D) for _ in range(3))  # the 7 packed new tokens: A's 1, then B's 6
    with NoHostSync():
        out, _ = paged_attention(module, q, k, v, None, scaling=D**-0.5)  # [1, 7, H, D]
    # reference: plain causal attention over each sequence's whole context
    ka = torch.cat([ctx_a[0], k[0, :, :1].transpose(0, 1)])  # [6, H, D]
    va = torch.cat([ctx_a[1], v[0, :, :1].transpose(0, 1)])
    want_a = F.scaled_dot_product_attention(q[:, :, :1], ka.transpose(0, 1)[None], va.transpose(0, 1)[None], scale=D**-0.5)
    want_b = F.scaled_dot_product_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], is_causal=True, scale=D**-0.5)
    torch.testing.assert_close(out[0, :1], want_a[0].transpose(0, 1))
    torch.testing.assert_close(out[0, 1:], want_b[0].transpose(0, 1))
