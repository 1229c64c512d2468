"""The Triton kernels against the fp32 reference (interpreted on CPU, compiled on a GPU)."""

import pytest
import torch

from kernel_cases import MIXES, problem, tenant_rows

from deltafleet.kernels import delta_linear_reference, group_rows
from deltafleet.kernels.triton_delta import _delta_kernel, delta_accumulate
from deltafleet.kernels.triton_fused import _fused_kernel, fused_delta_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 48, 96  # N not a multiple of the 16-wide tile, K = 3 words = 3 interpreter K steps


def run(form, x, w, signs, scales, rows):
    groups = group_rows(rows, signs.shape[0])
    if form == "fused":
        return fused_delta_linear(x, w, signs, scales, groups)
    y = (x.float() @ w.float().t()).to(x.dtype)  # stands in for the cuBLAS base GEMM
    return delta_accumulate(y, x, signs, scales, groups)


def assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    # the output's rounding: fp16 keeps 11 significant bits, bf16 8
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 8e-3}[dtype]
    err = (y.float().cpu() - ref.cpu()).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1.0), f"max error {err}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter setup")
def test_kernels_really_run_under_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_delta_kernel.fn, InterpretedFunction)
    assert isinstance(_fused_kernel.fn, InterpretedFunction)


@pytest.mark.parametrize("form", ["delta", "fused"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-matrix", "per-row"])
# bf16 only on a GPU (test_bf16_real_sizes_on_gpu): Triton 3.9's interpreter loads and stores
# bf16 exactly but its tl.dot of two bf16 tiles returns garbage (|err| ~1e10 on a 16x16 tile).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_kernel_matches_reference(mix, dtype, per_row, form):
    gen = torch.Generator().manual_seed(hash((mix, per_row)) % 2**31)
    t, rows = tenant_rows(mix, gen)
    x, w, signs, scales = problem(t, rows.numel(), N, K, dtype, per_row, gen, DEVICE)
    rows = rows.to(DEVICE)
    ref = delta_linear_reference(x, w, signs, scales, rows)
    assert_close(run(form, x, w, signs, scales, rows), ref, dtype)


@pytest.mark.parametrize("form", ["delta", "fused"])
def test_non_contiguous_inputs(form):
    gen = torch.Generator().manual_seed(7)
    t, rows = tenant_rows("zipf", gen)
    x, w, signs, scales = problem(2 * t, rows.numel(), N, K, torch.float32, True, gen, DEVICE)
    x_nc = x.t().contiguous().t()  # column-major x
    w_nc = torch.empty(K, N, device=DEVICE).t().copy_(w)  # W stored transposed
    signs_nc, scales_nc = signs[::2], scales[::2]  # every other tenant of a bigger stack
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or signs_nc.is_contiguous())
    ref = delta_linear_reference(x, w, signs[::2].contiguous(), scales[::2].contiguous(), rows.to(DEVICE))
    assert_close(run(form, x_nc, w_nc, signs_nc, scales_nc, rows.to(DEVICE)), ref, torch.float32)


def test_delta_kernel_leaves_base_rows_untouched():
    gen = torch.Generator().manual_seed(3)
    x, w, signs, scales = problem(2, 5, N, K, torch.float32, False, gen, DEVICE)
    rows = torch.tensor([-1, 0, -1, 1, -1], device=DEVICE)
    y = torch.full((5, N), 3.0, device=DEVICE)
    delta_accumulate(y, x, signs, scales, group_rows(rows, 2))
    assert torch.equal(y[rows == -1], torch.full((3, N), 3.0, device=DEVICE))
    assert not torch.equal(y[rows >= 0], torch.full((2, N), 3.0, device=DEVICE))


def test_wrapper_errors_name_the_problem():
    x, w, signs, scales = problem(2, 3, N, K, torch.float32, False, torch.Generator().manual_seed(0), DEVICE)
    groups = group_rows(torch.zeros(3, dtype=torch.long, device=DEVICE), 2)
    with pytest.raises(ValueError, match="y must be"):
        delta_accumulate(torch.zeros(3, N + 1, device=DEVICE), x, signs, scales, groups)
    with pytest.raises(ValueError, match="groups cover 3 rows but x has M=2"):
        fused_delta_linear(x[:2], w, signs, scales, groups)
    with pytest.raises(TypeError, match="dtype mismatch"):
        fused_delta_linear(x, w.half(), signs, scales, groups)


@pytest.mark.gpu
@pytest.mark.parametrize("tenants,rows_per_tenant", [(1, 1), (16, 1), (64, 1), (4, 128)])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_bf16_real_sizes_on_gpu(shape, tenants, rows_per_tenant):
    n, k = shape
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(tenants).repeat_interleave(rows_per_tenant)
    rows[::7] = -1
    x, w, signs, scales = problem(tenants, rows.numel(), n, k, torch.bfloat16, tenants % 2 == 0, gen, "cuda")
    rows = rows.cuda()
    ref = delta_linear_reference(x, w, signs, scales, rows)
    groups = group_rows(rows, tenants)
    for y in (fused_delta_linear(x, w, signs, scales, groups), delta_accumulate(torch.nn.functional.linear(x, w), x, signs, scales, groups)):
        err = (y.float() - ref).abs().max().item()
        assert err <= 1.6e-2 * ref.abs().max().item(), f"max error {err}"
