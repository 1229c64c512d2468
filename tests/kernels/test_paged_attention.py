"""The paged attention kernel against SDPA over a gathered cache (interpreted on CPU, compiled on a GPU).

Caches are small and their blocks scattered (a sequence's blocks are a random, non-contiguous
choice of the cache's), contexts are not multiples of the 16-position tile, and the reference is
fp32: index_select of each sequence's context + F.scaled_dot_product_attention with the mask
serving uses (AttnGroup.mask)."""

import pytest
import torch
import torch.nn.functional as F

from deltafleet.kernels.paged_attention import paged_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # the output's rounding (and p's, in 16 bits)
BLOCK = 4  # KV cache block size: a 16-position tile spans 4 scattered blocks
HEADS = [(8, 2), (4, 4)]  # (H, KVH): GQA with 4 query heads per KV head, and MHA


def cache_and_tables(lengths, kvh, d, dtype, gen):
    """A KV cache [P, KVH, D] (the last block is scratch) and kv_index [b, L] of scattered blocks."""
    nb = -(-max(lengths) // BLOCK)
    n_blocks = len(lengths) * nb + 4  # a few blocks no sequence holds
    k_cache = torch.randn((n_blocks + 1) * BLOCK, kvh, d, generator=gen).to(dtype)  # [P, KVH, D]
    v_cache = torch.randn((n_blocks + 1) * BLOCK, kvh, d, generator=gen).to(dtype)
    perm = torch.randperm(n_blocks, generator=gen)  # each sequence's blocks: distinct, out of order
    table = perm[: len(lengths) * nb].view(len(lengths), nb)  # [b, blocks]
    j = torch.arange(nb * BLOCK)  # [L]
    kv_index = table[:, j // BLOCK] * BLOCK + j % BLOCK  # [b, L]
    return k_cache, v_cache, kv_index


def reference(q, k_cache, v_cache, kv_index, q_pos, scale, window=None):
    """fp32 gather + SDPA: q [b, Q, H, D] -> [b, Q, H, D]."""
    b, nq, h, d = q.shape
    length, kvh = kv_index.shape[1], k_cache.shape[1]
    k = k_cache.float().index_select(0, kv_index.reshape(-1)).view(b, length, kvh, d).transpose(1, 2)  # [b, KVH, L, D]
    v = v_cache.float().index_select(0, kv_index.reshape(-1)).view(b, length, kvh, d).transpose(1, 2)
    j = torch.arange(length)[None, None]  # [1, 1, L]
    p = q_pos[:, :, None]  # [b, Q, 1]
    mask = j <= p
    if window is not None:
        mask = mask & (p - j < window)
    o = F.scaled_dot_product_attention(q.float().transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=kvh != h)  # [b, H, Q, D]
    return o.transpose(1, 2)


def run(q, k_cache, v_cache, kv_index, q_pos, scale, window=None):
    to = lambda t: t.to(DEVICE)  # noqa: E731
    o = paged_attention_triton(to(q), to(k_cache), to(v_cache), to(kv_index), to(q_pos), scale, window, block_m=16, block_n=16)
    assert o.dtype == q.dtype and o.shape == q.shape
    return o.float().cpu()


def assert_close(o, ref, dtype):
    err = (o - ref).abs().max().item()
    assert err <= TOL[dtype] * max(ref.abs().max().item(), 1.0), f"max error {err}"


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_rows_of_different_context_lengths_match_sdpa_on_the_gathered_cache(dtype, heads):
    gen = torch.Generator().manual_seed(0)
    h, kvh = heads
    lengths = [1, 7, 16, 37]  # one position, inside a tile, exactly a tile, 2 tiles + a tail
    k_cache, v_cache, kv_index = cache_and_tables(lengths, kvh, 64, dtype, gen)
    q = torch.randn(len(lengths), 1, h, 64, generator=gen).to(dtype)  # [b, 1, H, D]
    q_pos = torch.tensor(lengths)[:, None] - 1  # [b, 1]: the new token is the context's last
    o = run(q, k_cache, v_cache, kv_index, q_pos, 0.125)
    assert_close(o, reference(q, k_cache, v_cache, kv_index, q_pos, 0.125), dtype)


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_prefill_chunk_after_a_cached_prefix_matches_sdpa(dtype, window):
    gen = torch.Generator().manual_seed(1)
    start, n = 13, 9  # 13 positions cached, 9 new ones: the chunk's tiles start mid-tile
    k_cache, v_cache, kv_index = cache_and_tables([start + n], 2, 32, dtype, gen)
    q = torch.randn(1, n, 8, 32, generator=gen).to(dtype)  # [1, Q, H, D]
    q_pos = torch.arange(start, start + n)[None]  # [1, Q]
    o = run(q, k_cache, v_cache, kv_index, q_pos, 0.2, window)
    assert_close(o, reference(q, k_cache, v_cache, kv_index, q_pos, 0.2, window), dtype)


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
def test_a_sliding_window_on_decode_rows_matches_sdpa(heads):
    gen = torch.Generator().manual_seed(2)
    h, kvh = heads
    lengths = [3, 20, 45]  # inside the window, and windows that skip whole leading tiles
    k_cache, v_cache, kv_index = cache_and_tables(lengths, kvh, 16, torch.float32, gen)
    q = torch.randn(len(lengths), 1, h, 16, generator=gen)  # [b, 1, H, D]
    q_pos = torch.tensor(lengths)[:, None] - 1  # [b, 1]
    o = run(q, k_cache, v_cache, kv_index, q_pos, 0.25, window=5)
    assert_close(o, reference(q, k_cache, v_cache, kv_index, q_pos, 0.25, window=5), torch.float32)


def test_padding_rows_on_the_scratch_block_leave_real_rows_alone():
    """A fixed-shape decode step's padding rows: kv_index all at the scratch block, q_pos 0."""
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 30]
    k_cache, v_cache, kv_index = cache_and_tables(lengths, 2, 16, torch.float32, gen)
    scratch = k_cache.shape[0] - BLOCK  # the scratch block's first position
    kv_index = torch.cat([kv_index, torch.full((2, kv_index.shape[1]), scratch)])  # [4, L]: 2 padding rows
    q = torch.randn(4, 1, 8, 16, generator=gen)  # [4, 1, H, D]
    q_pos = torch.tensor([[8], [29], [0], [0]])  # [4, 1]
    o = run(q, k_cache, v_cache, kv_index, q_pos, 0.25)
    assert_close(o, reference(q, k_cache, v_cache, kv_index, q_pos, 0.25), torch.float32)
    # each padding row sees only the scratch position: its V, for each KV head's 4 query heads
    assert torch.equal(o[2:], v_cache[scratch].repeat_interleave(4, 0).expand(2, 1, 8, 16))


def test_positions_past_a_decode_rows_context_are_never_read():
    """Tiles past q_pos are skipped and the tail of the last tile masked at load: NaN K/V
    there (stale or never written) would otherwise reach the output (0 * NaN = NaN)."""
    gen = torch.Generator().manual_seed(4)
    lengths = [5, 40]
    k_cache, v_cache, kv_index = cache_and_tables(lengths, 2, 16, torch.float32, gen)
    q_pos = torch.tensor(lengths)[:, None] - 1  # [b, 1]
    past = kv_index[0, 5:]  # row 0's positions past its context, in its padded kv_index
    dirty_k, dirty_v = k_cache.clone(), v_cache.clone()
    dirty_k[past], dirty_v[past] = float("nan"), float("nan")
    q = torch.randn(2, 1, 8, 16, generator=gen)  # [b, 1, H, D]
    o = run(q, dirty_k, dirty_v, kv_index, q_pos, 0.25)
    assert_close(o, reference(q, k_cache, v_cache, kv_index, q_pos, 0.25), torch.float32)


@pytest.mark.parametrize("d", [48, 8])
def test_a_head_dim_that_is_not_a_power_of_two_from_16_is_refused(d):
    q = torch.zeros(1, 1, 2, d)
    cache = torch.zeros(8, 2, d)
    with pytest.raises(ValueError, match=f"head_dim {d} is not supported"):
        paged_attention_triton(q, cache, cache, torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 7], ids=["causal", "window"])
def test_servings_cuda_paged_attention_matches_its_cpu_gather_path(window, monkeypatch):
    """serving's paged_attention: the Triton kernel on CUDA against gather + SDPA on CPU, on
    a step of two decode rows and a prefill chunk after a cached prefix, fp16 cache."""
    from types import SimpleNamespace

    from deltafleet.serving import paged_kv
    from deltafleet.serving.paged_kv import PagedKVCache, PagedContext, StepLayout, paged_attention

    gen = torch.Generator().manual_seed(5)
    h, kvh, d, bs = 8, 2, 64, 16
    chunks = [([3, 0], 20, 1), ([5], 7, 1), ([1, 4, 2], 30, 9)]  # (blocks, cached, new): 2 decode rows, 1 chunk
    t = sum(c[2] for c in chunks)
    query = torch.randn(1, h, t, d, generator=gen).half()  # [1, H, T, D]
    key = torch.randn(1, kvh, t, d, generator=gen).half()  # [1, KVH, T, D]
    value = torch.randn(1, kvh, t, d, generator=gen).half()
    outs = []
    for device in ("cpu", "cuda"):
        cache = PagedKVCache(1, 6, bs, kvh, d, torch.float16, torch.device(device))
        prefix = torch.Generator().manual_seed(6)  # the same cached K/V on both devices
        cache.k.copy_(torch.randn(cache.k.shape, generator=prefix)), cache.v.copy_(torch.randn(cache.v.shape, generator=prefix))
        ctx = PagedContext(cache)
        ctx.layout = StepLayout.build(chunks, bs, torch.device(device))
        module = SimpleNamespace(deltafleet_paged=ctx, layer_idx=0)
        q, k, v = (x.to(device) for x in (query, key, value))
        q = q.float() if device == "cpu" else q  # the CPU path in fp32: the reference
        if device == "cuda":  # the CUDA path must not gather + SDPA
            monkeypatch.setattr(paged_kv, "F", None)
        o, _ = paged_attention(module, q, k, v, None, scaling=d ** -0.5, sliding_window=window)  # [1, T, H, D]
        outs.append(o.float().cpu())
    assert_close(outs[1], outs[0], torch.float16)
