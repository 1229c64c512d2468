"""The Triton kernels against the fp32 reference (interpreted on CPU, compiled on a GPU).

Tiles here are small on purpose (BLOCK_K = 64: two sign words per tile) and shapes are not
multiples of them (K = 160: a partial K tile; N = 40: an N tail), so multi-word tiles,
masked tails and split-K all run under the interpreter."""

import pytest
import torch
import triton
import triton.language as tl

from kernel_cases import MIXES, assert_close, problem, tenant_rows

from deltafleet.kernels import delta_linear, delta_linear_reference
from deltafleet.kernels.launch_table import DEFAULT, DecodeConfig, LaunchTable, PrefillConfig, bucket, split_k_for, table_for
from deltafleet.kernels.segments import SegmentMeta, tile_cap
from deltafleet.kernels.triton_decode import _add_pairs, _decode_kernel, decode_delta_linear
from deltafleet.kernels.triton_delta import _prefill_delta_kernel, prefill_delta_accumulate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 40, 160  # N tail against BLOCK_N = 16; K = 2 full 64-wide tiles + one 32-wide partial tile
DECODE = DecodeConfig(rows=4, block_n=16, block_k=64, num_stages=1)
PREFILL = PrefillConfig(block_m=16, block_n=16, block_k=64, num_stages=1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def decode(x, w, signs, scales, rows, split_k=1, config=DECODE):
    return decode_delta_linear(x, w, signs, scales, rows.to(torch.int32), config, split_k)


def prefill(x, w, signs, scales, rows):
    y = (x.float() @ w.float().t()).to(x.dtype)  # stands in for the cuBLAS base GEMM
    meta = SegmentMeta(rows.numel(), signs.shape[0], PREFILL.block_m, rows.device).fill(rows)
    return prefill_delta_accumulate(y, x, signs, scales, meta, PREFILL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter setup")
def test_kernels_really_run_under_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_decode_kernel, InterpretedFunction)
    assert isinstance(_prefill_delta_kernel, InterpretedFunction)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-matrix", "per-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
def test_decode_kernel_matches_reference(mix, dtype, per_row, split_k):
    gen = torch.Generator().manual_seed(hash((mix, per_row, split_k)) % 2**31)
    t, rows = tenant_rows(mix, gen)
    x, w, signs, scales = problem(t, rows.numel(), N, K, dtype, per_row, gen, DEVICE)
    rows = rows.to(DEVICE)
    assert_close(decode(x, w, signs, scales, rows, split_k), delta_linear_reference(x, w, signs, scales, rows), dtype)


# bf16 prefill only on a GPU: Triton 3.9's interpreter returns garbage for tl.dot of two bf16
# tiles (|err| ~1e10 on a 16x16 tile); the decode kernel has no tl.dot and runs bf16 above.
@pytest.mark.parametrize("per_row", [False, True], ids=["per-matrix", "per-row"])
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.bfloat16 or DEVICE == "cuda"], ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
def test_prefill_kernel_matches_reference(mix, dtype, per_row):
    gen = torch.Generator().manual_seed(hash((mix, per_row)) % 2**31)
    t, rows = tenant_rows(mix, gen)
    x, w, signs, scales = problem(t, rows.numel(), N, K, dtype, per_row, gen, DEVICE)
    rows = rows.to(DEVICE)
    assert_close(prefill(x, w, signs, scales, rows), delta_linear_reference(x, w, signs, scales, rows), dtype)


@pytest.mark.parametrize("rows_per_program", [1, 2, 4, 8, 16])
def test_decode_row_blocks_of_every_size(rows_per_program):
    """ROWS = 1 (one row per program), 2, 4 (partial last blocks for 5 rows), 8, 16 (one block, padded to
    16 rows for tl.dot by 8, or not at all): the padding rows of the mma tile never reach y."""
    gen = torch.Generator().manual_seed(rows_per_program)
    x, w, signs, scales = problem(4, 5, N, K, torch.float16, False, gen, DEVICE)
    rows = torch.tensor([3, -1, 0, 3, 1], device=DEVICE)
    config = DecodeConfig(rows=rows_per_program, block_n=16 // rows_per_program or 1, block_k=64, num_stages=1)
    ref = delta_linear_reference(x, w, signs, scales, rows)
    assert_close(decode(x, w, signs, scales, rows, config=config), ref, torch.float16)


@triton.jit
def _add_pairs_kernel(a_ptr, b_ptr, out_ptr, BF16: tl.constexpr, ASM: tl.constexpr):
    i = tl.arange(0, 1024)
    tl.store(out_ptr + i, _add_pairs(tl.load(a_ptr + i), tl.load(b_ptr + i), BF16, ASM))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_packed_pair_sums_round_like_16_bit_adds(dtype):
    """The decode kernel's packed adds (HADD2 / HFMA2 by 1.0 on a GPU, their pure-Triton twin under the
    interpreter) give, per half, exactly the 16-bit sum rounded to nearest even: low half = the first value."""
    gen = torch.Generator().manual_seed(21)
    mags = 2.0 ** torch.randint(-6, 6, (2, 1024, 2), generator=gen)  # sums across exponent gaps; ties happen
    a16, b16 = (torch.randn(2, 1024, 2, generator=gen) * mags).to(dtype)
    a, b = a16.view(torch.int32).squeeze(-1), b16.view(torch.int32).squeeze(-1)  # [1024] pairs
    out = torch.empty(1024, dtype=torch.int32, device=DEVICE)
    _add_pairs_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), out, BF16=dtype == torch.bfloat16, ASM=DEVICE == "cuda")
    got = out.cpu().view(dtype).view(1024, 2)
    want = (a16.float() + b16.float()).to(dtype)  # the fp32 sum of two 16-bit values, rounded once
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_non_contiguous_inputs(path):
    gen = torch.Generator().manual_seed(7)
    t, rows = tenant_rows("zipf", gen)
    x, w, signs, scales = problem(2 * t, rows.numel(), N, K, torch.float32, True, gen, DEVICE)
    x_nc = x.t().contiguous().t()  # column-major x
    w_nc = torch.empty(K, N, device=DEVICE).t().copy_(w)  # W stored transposed
    signs_nc, scales_nc = signs[::2], scales[::2]  # every other tenant of a bigger stack
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or signs_nc.is_contiguous())
    rows = rows.to(DEVICE)
    ref = delta_linear_reference(x, w, signs[::2].contiguous(), scales[::2].contiguous(), rows)
    run = decode if path == "decode" else prefill
    assert_close(run(x_nc, w_nc, signs_nc, scales_nc, rows), ref, torch.float32)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_last_slot_of_a_256_slot_stack(path):
    gen = torch.Generator().manual_seed(11)
    x, w, signs, scales = problem(256, 6, N, 64, torch.float16, True, gen, DEVICE)
    rows = torch.tensor([255, 0, -1, 255, 128, 255], device=DEVICE)
    run = decode if path == "decode" else prefill
    assert_close(run(x, w, signs, scales, rows), delta_linear_reference(x, w, signs, scales, rows), torch.float16)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_all_base_batch_is_the_base_gemm(path):
    gen = torch.Generator().manual_seed(12)
    x, w, signs, scales = problem(3, 7, N, K, torch.float32, False, gen, DEVICE)
    rows = torch.full((7,), -1, device=DEVICE)
    run = decode if path == "decode" else prefill
    assert_close(run(x, w, signs, scales, rows), x @ w.t(), torch.float32)


def test_zero_scale_slot_reads_no_delta():
    """A slot whose per-matrix scale is 0 (a module the tenant left untouched) gives the base rows."""
    gen = torch.Generator().manual_seed(13)
    x, w, signs, scales = problem(3, 4, N, K, torch.float32, False, gen, DEVICE)
    scales[1] = 0.0
    signs[1] = -1  # garbage that would show if it were read with a non-zero scale
    rows = torch.tensor([1, 0, 1, 2], device=DEVICE)
    y = decode(x, w, signs, scales, rows)
    assert_close(y, delta_linear_reference(x, w, signs, scales, rows), torch.float32)
    torch.testing.assert_close(y[rows == 1], (x @ w.t())[rows == 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mix", ["distinct", "zipf"])  # 13 rows -> decode path, 37 -> prefill path
def test_dispatcher_custom_op_matches_reference(mix):
    gen = torch.Generator().manual_seed(14)
    t, rows = tenant_rows(mix, gen)
    x, w, signs, scales = problem(t, rows.numel(), N, K, torch.float16, True, gen, DEVICE)
    rows = rows.to(DEVICE)
    y = delta_linear(x, w, signs, scales, rows, backend="triton")
    assert_close(y, delta_linear_reference(x, w, signs, scales, rows), torch.float16)


def test_custom_op_has_a_working_fake_impl():
    """torch.compile and CUDA-graph capture see one op; its fake impl gives the right shape/dtype."""
    gen = torch.Generator().manual_seed(15)
    x, w, signs, scales = problem(2, 3, N, 64, torch.float16, False, gen, DEVICE)
    rows = torch.tensor([0, -1, 1], device=DEVICE)
    torch.library.opcheck(torch.ops.deltafleet.delta_linear.default, (x, w, signs, scales, rows),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_op_without_graph_breaks():
    gen = torch.Generator().manual_seed(16)
    x, w, signs, scales = problem(3, 4, N, 64, torch.float16, False, gen, DEVICE)
    rows = torch.tensor([0, 2, -1, 1], device=DEVICE)

    def layer(x, w, signs, scales, rows):
        return delta_linear(x, w, signs, scales, rows, backend="triton") * 2

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    ref = delta_linear_reference(x, w, signs, scales, rows) * 2
    assert_close(compiled(x, w, signs, scales, rows), ref, torch.float16)


def forbid_host_syncs(monkeypatch, names=("item", "tolist", "__bool__", "__int__", "__index__", "__float__")):
    """Make every tensor->host read (a sync on CUDA) raise."""

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in names:
        monkeypatch.setattr(torch.Tensor, name, sync)


@pytest.mark.parametrize("mix", ["distinct", "zipf"])  # decode path (13 rows), prefill path (37 rows)
def test_dispatch_reads_nothing_back_from_the_device(mix, monkeypatch):
    """The whole CUDA path of delta_linear (checks, table, metadata, launch) never reads a tensor
    value on the host, so it can be captured in a CUDA graph."""
    gen = torch.Generator().manual_seed(17)
    t, rows = tenant_rows(mix, gen)
    x, w, signs, scales = problem(t, rows.numel(), N, 64, torch.float16, False, gen, DEVICE)
    rows = rows.to(DEVICE)
    ref = delta_linear_reference(x, w, signs, scales, rows)
    forbid_host_syncs(monkeypatch)
    y = delta_linear(x, w, signs, scales, rows, backend="triton")
    monkeypatch.undo()
    assert_close(y, ref, torch.float16)


def test_segment_meta_is_built_without_host_syncs(monkeypatch):
    """Every step of the builder stays on the device: any .item()/.tolist()/int()/bool() of a
    tensor (a host sync on CUDA) fails the test. The buffers are written in place."""
    rows = torch.tensor([2, -1, 0, 2, 0, -1, 1, 1, 1, 1, 1], device=DEVICE)
    meta = SegmentMeta(16, 3, 2, torch.device(DEVICE))  # buffers for up to 16 rows (the bucket of 11)
    buffers = [b.data_ptr() for b in (meta.order, meta.tile_slot, meta.tile_lo, meta.tile_hi)]
    forbid_host_syncs(monkeypatch, names=("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy"))
    meta.fill(rows)
    seg = meta.fill(rows.flip(0))  # a second mix into the same buffers
    monkeypatch.undo()
    assert [b.data_ptr() for b in (seg.order, seg.tile_slot, seg.tile_lo, seg.tile_hi)] == buffers
    assert seg.cap == tile_cap(11, 3, 2) == 6 + 4
    # rows.flip(0) = [1, 1, 1, 1, 1, -1, 0, 2, 0, -1, 2]: slot 0 rows {6, 8}, 1 rows {0..4}, 2 rows {7, 10}
    assert seg.order.tolist() == [5, 9, 6, 8, 0, 1, 2, 3, 4, 7, 10]
    assert seg.tile_slot.tolist() == [0, 1, 1, 1, 2, -1, -1, -1, -1, -1]
    assert seg.tile_lo.tolist()[:5] == [2, 4, 6, 8, 9]
    assert seg.tile_hi.tolist()[:5] == [4, 6, 8, 9, 11]


def test_launch_table_is_fixed_per_bucket_and_round_trips():
    assert [bucket(m) for m in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert DEFAULT.decode_config(3) == DEFAULT.decode[4]
    assert DEFAULT.decode_config(16).rows_per_program(9) == 16
    assert table_for("Some Future GPU 9000") is DEFAULT
    table = LaunchTable(gpu="x", decode={1: DecodeConfig(1, 32, 512, split_k=2)}, decode_max_rows=8)
    assert LaunchTable.from_json(table.to_json()) == table
    # split-K only where N alone leaves SMs idle, and never below 2 K tiles per split
    assert split_k_for(DEFAULT.decode[1], 1, 4096, 4096, sms=132) == 1  # 512 column tiles already
    assert split_k_for(DEFAULT.decode[1], 1, 1024, 4096, sms=132) == 4  # 128 tiles -> 512 programs
    assert split_k_for(DEFAULT.decode[1], 1, 64, 512, sms=132) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tenants,rows_per_tenant", [(1, 1), (16, 1), (64, 1), (4, 16), (4, 128)])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_real_sizes_on_gpu(shape, tenants, rows_per_tenant, dtype):
    n, k = shape
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(tenants).repeat_interleave(rows_per_tenant)
    rows[::7] = -1
    x, w, signs, scales = problem(tenants, rows.numel(), n, k, dtype, tenants % 2 == 0, gen, "cuda")
    rows = rows.cuda()
    ref = delta_linear_reference(x, w, signs, scales, rows)
    y = delta_linear(x, w, signs, scales, rows)
    err = (y.float() - ref).abs().max().item()
    assert err <= 1.6e-2 * ref.abs().max().item(), f"max error {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 48])  # decode bucket, the decode limit, the prefill path
def test_cuda_graph_replays_another_tenant_mix(m):
    """Capture with one mix, replay with another of the same size: the slots live on the device."""
    gen = torch.Generator().manual_seed(1)
    x, w, signs, scales = problem(8, m, 4096, 4096, torch.bfloat16, False, gen, "cuda")
    slots = torch.zeros(m, dtype=torch.int64, device="cuda")  # the static input buffer
    first = torch.arange(m, device="cuda") % 8
    second = torch.where(torch.arange(m, device="cuda") % 3 == 0, -1, 7 - first)
    slots.copy_(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        delta_linear(x, w, signs, scales, slots)  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")  # any host sync during capture raises
    try:
        with torch.cuda.graph(graph):
            y = delta_linear(x, w, signs, scales, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for mix in (second, first):
        slots.copy_(mix)
        graph.replay()
        ref = delta_linear_reference(x, w, signs, scales, mix)
        err = (y.float() - ref).abs().max().item()
        assert err <= 1.6e-2 * ref.abs().max().item(), f"max error {err}"


@pytest.mark.gpu
def test_fp32_on_cuda_is_refused_with_a_message():
    x, w, signs, scales = problem(1, 2, 64, 64, torch.float32, False, torch.Generator().manual_seed(0), "cuda")
    with pytest.raises(TypeError, match="fp32 activations on CUDA"):
        delta_linear(x, w, signs, scales, torch.zeros(2, dtype=torch.long, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (not a pass)")
def test_launches_on_the_inputs_device():
    gen = torch.Generator().manual_seed(2)
    x, w, signs, scales = problem(2, 3, 256, 256, torch.float16, False, gen, "cuda:1")
    rows = torch.tensor([0, 1, -1], device="cuda:1")
    y = delta_linear(x, w, signs, scales, rows)
    assert y.device == torch.device("cuda:1")
    assert_close(y, delta_linear_reference(x, w, signs, scales, rows), torch.float16)
