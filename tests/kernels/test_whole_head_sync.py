"""Rows of tenants that store a matrix whole (a whole lm_head) are computed without a host sync
on CUDA in every dtype (issue 22, point 3): torch's grouped GEMM is sync-free on CUDA only for
bf16 on sm90/sm100 and copies its offsets to the host otherwise, so an fp16 decode step with a
whole head could not be captured in a CUDA graph. `_whole_rows` takes the Triton grouped GEMM
on CUDA, which reads the offsets on the device.

On CPU the CUDA path is run as CUDA would run it: the path chosen for device "cuda", the
Triton kernel under the interpreter as one opaque op, inside NoHostSync(cuda_rules=True).
It lives in tests/kernels because the interpreter must be set before triton is first imported
(conftest.py here does; tests/serving's conftest imports transformers, which imports triton)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltafleet.kernels import triton_grouped
from deltafleet.serving import layers
from deltafleet.serving.slot_stack import SlotStack
from kernel_cases import TOL

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))  # the serving tests' CUDA-graph checks
from graph_safety import NoHostSync, OpTrace, triton_launch_as_one_op  # noqa: E402

N, K, SLOTS = 40, 96, 4
FIRST_MIX = [3, -1, 1, 3, 0, 1]  # slots 1 and 3 store the matrix whole; 0 and -1 (the base) do not
SECOND_MIX = [1, 1, 1, 0, 3, -1]


def whole_stack(dtype, device, n=N, k=K):
    """A slot stack with whole matrices [n, k] for slots 1 and 3; returns it and its matrices by slot."""
    gen = torch.Generator().manual_seed(0)
    stack = SlotStack({"weight": ((n, k), dtype)}, SLOTS, torch.device(device))
    mats = {s: torch.randn(n, k, generator=gen).to(dtype).to(device) for s in (1, 3)}  # [n, k] each
    for s, w in mats.items():
        stack.put(s, {"weight": w})
    return stack, mats


def step(mix, dtype, device, n=N, k=K):
    """x [M, k], y [M, n] (the rows' base result), rows [M] for one decode step."""
    gen = torch.Generator().manual_seed(len(mix))
    x = torch.randn(len(mix), k, generator=gen).to(dtype).to(device)  # [M, k]
    y = torch.randn(len(mix), n, generator=gen).to(dtype).to(device)  # [M, n]
    return x, y, torch.tensor(mix, dtype=torch.int64, device=device)


def expected(x, y, rows, mats):
    """[M, N] fp32: each row of a whole-matrix slot is x·W_sᵀ, the others keep y."""
    out = y.float().clone()
    for i, s in enumerate(rows.tolist()):
        if s in mats:
            out[i] = x[i].float() @ mats[s].float().t()
    return out


@pytest.mark.parametrize("device_type, path", [("cuda", "triton"), ("cpu", "torch"), ("mps", "torch")])
def test_whole_rows_take_the_triton_grouped_gemm_on_cuda_only(device_type, path):
    assert layers.whole_rows_path(device_type) == path


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_torch_grouped_mm_off_bf16_is_a_sync_under_cuda_rules(dtype):
    """What the old `_whole_rows` ran on CUDA for fp16: CPU tests see it only with cuda_rules."""
    x, w = torch.randn(3, K).to(dtype), torch.randn(2, N, K).to(dtype)
    offs = torch.tensor([1, 3], dtype=torch.int32)
    with NoHostSync():
        F.grouped_mm(x, w.transpose(1, 2), offs=offs)  # CPU rules: a loop over host memory, no sync
    with pytest.raises(AssertionError, match="copies its offsets to the host"), NoHostSync(cuda_rules=True):
        F.grouped_mm(x, w.transpose(1, 2), offs=offs)


def test_fp16_whole_rows_as_cuda_computes_them_read_nothing_on_the_host(monkeypatch):
    cuda_path = layers.whole_rows_path("cuda")
    monkeypatch.setattr(layers, "whole_rows_path", lambda device_type: cuda_path)
    stack, mats = whole_stack(torch.float16, "cpu")
    x, y, rows = step(FIRST_MIX, torch.float16, "cpu")
    with triton_launch_as_one_op(triton_grouped), NoHostSync(cuda_rules=True):
        out = layers._whole_rows(x, y, stack, rows, None)  # [M, N]
    ref = expected(x, y, rows, mats)
    assert out.dtype == torch.float16
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[torch.float16] * ref.abs().max().item(), f"max error {err}"
    keep = torch.tensor([s not in mats for s in FIRST_MIX])
    assert torch.equal(out[keep], y[keep])  # rows without a whole matrix are the base's, untouched


def test_the_cuda_path_matches_torch_grouped_mm_in_fp32_with_a_bias(monkeypatch):
    stack, _ = whole_stack(torch.float32, "cpu")
    x, y, rows = step(FIRST_MIX, torch.float32, "cpu")
    bias = torch.randn(len(FIRST_MIX), N)  # [M, N]: each row's tenant's bias
    torch_out = layers._whole_rows(x, y, stack, rows, bias)  # [M, N], F.grouped_mm on CPU
    monkeypatch.setattr(layers, "whole_rows_path", lambda device_type: "triton")
    triton_out = layers._whole_rows(x, y, stack, rows, bias)  # [M, N]
    err = (triton_out - torch_out).abs().max().item()
    assert err <= TOL[torch.float32] * torch_out.abs().max().item(), f"max error {err}"


def test_the_cuda_path_runs_the_same_ops_for_any_row_to_entry_mix(monkeypatch):
    """A CUDA graph replays what it captured: two mixes of one size must trace the same ops."""
    monkeypatch.setattr(layers, "whole_rows_path", lambda device_type: "triton")
    stack, _ = whole_stack(torch.float16, "cpu")
    traces = []
    for mix in (FIRST_MIX, SECOND_MIX):
        x, y, rows = step(mix, torch.float16, "cpu")
        trace = OpTrace()
        with triton_launch_as_one_op(triton_grouped, trace), trace:
            layers._whole_rows(x, y, stack, rows, None)
        traces.append(trace.ops)
    assert traces[0] == traces[1]
    assert any("triton_grouped._launch" in op for op, _ in traces[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_cuda_graph_of_whole_rows_replays_another_mix_as_eager(dtype):
    """Capture with one row -> entry mix, replay with another: equals eager, and the reference."""
    n, k = 5000, 4096  # a real hidden size; N not a multiple of BLOCK_N
    stack, mats = whole_stack(dtype, "cuda", n, k)
    x, y, _ = step(FIRST_MIX, dtype, "cuda", n, k)
    rows = torch.tensor(FIRST_MIX, dtype=torch.int64, device="cuda")  # the static input buffer
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layers._whole_rows(x, y, stack, rows, None)  # warm-up compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")  # any host sync during capture raises
    try:
        with torch.cuda.graph(graph):
            out = layers._whole_rows(x, y, stack, rows, None)  # [M, N]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for mix in (SECOND_MIX, FIRST_MIX):
        rows.copy_(torch.tensor(mix, device="cuda"))
        graph.replay()
        eager = layers._whole_rows(x, y, stack, rows, None)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        ref = expected(x, y, rows, mats)
        err = (out.float() - ref).abs().max().item()
        assert err <= TOL[dtype] * ref.abs().max().item(), f"max error {err}"
