"""The Triton grouped GEMM (whole matrices of several tenants, offsets on the device) against a
per-group fp32 torch reference: interpreted on CPU, compiled on a GPU.

Tiles are small here (BLOCK_N = 16, BLOCK_K = 64) and N = 40, K = 160 are not multiples of
them, so column tails, a partial K tile and several N tiles all run under the interpreter."""

import pytest
import torch

from kernel_cases import assert_close

from deltafleet.kernels.triton_grouped import _grouped_kernel, grouped_mm_triton, rows_per_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 40, 160
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def run(x, w, offs):
    return grouped_mm_triton(x, w, torch.tensor(offs, dtype=torch.int32, device=DEVICE), block_n=16, block_k=64)


def reference(x, w, offs):
    """[M, N] fp32: rows [offs[g - 1], offs[g]) times weight[g]ᵀ, group 0 from row 0."""
    ends = list(offs)
    starts = [0] + ends[:-1]
    parts = [x[s:e].float() @ w[g].float().t() for g, (s, e) in enumerate(zip(starts, ends))]  # [rows of g, N]
    return torch.cat(parts)


def problem(m, e, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=gen).to(dtype).to(DEVICE)  # [M, K]
    w = torch.randn(e, N, K, generator=gen).to(dtype).to(DEVICE)  # [E, N, K]
    return x, w


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter setup")
def test_the_grouped_kernel_really_runs_under_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_grouped_kernel, InterpretedFunction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offs", [
    [2, 2, 7],  # an empty group between two others
    [0, 3, 7],  # group 0 empty
    [0, 7, 7],  # one group holds every row, the others are empty
    [1, 4, 7],  # every group has rows
], ids=["middle-empty", "first-empty", "one-group", "all-groups"])
def test_each_groups_rows_use_that_groups_weight(offs, dtype):
    x, w = problem(7, 3, dtype)
    assert_close(run(x, w, offs), reference(x, w, offs), dtype)


@pytest.mark.parametrize("offs", [
    [0, 1, 1, 2, 3],  # 3 rows in groups 1, 3, 4: a grid of 3 programs per N tile finds them
    [0, 0, 0, 0, 3],  # only the last group has rows
    [3],  # a single group
], ids=["scattered", "last-only", "single"])
def test_more_groups_than_rows_each_busy_group_is_found_on_the_device(offs):
    x, w = problem(3, len(offs), torch.float16)
    assert_close(run(x, w, offs), reference(x, w, offs), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_an_entry_sorted_first_fall_in_group_0(dtype):
    """As `_whole_rows` lays them out: 3 rows with no whole matrix sort first, then 1 row of
    entry 0 and 2 of entry 1; offs = [4, 6] puts the 3 leading rows in entry 0's group."""
    x, w = problem(6, 2, dtype)
    y = run(x, w, [4, 6])
    assert_close(y, reference(x, w, [4, 6]), dtype)
    assert_close(y[:3], x[:3].float() @ w[0].float().t(), dtype)


def test_a_group_longer_than_a_row_tile_is_computed_tile_by_tile():
    m = 150  # BLOCK_M = 64: group 0 spans 2 tiles (the second partial), group 1 spans 2
    assert rows_per_tile(m) == 64
    x, w = problem(m, 2, torch.float16)
    assert_close(run(x, w, [70, 150]), reference(x, w, [70, 150]), torch.float16)


def test_fp32_output_for_fp16_inputs_keeps_the_fp32_accumulation():
    x, w = problem(5, 2, torch.float16)
    y = grouped_mm_triton(x, w, torch.tensor([2, 5], dtype=torch.int32, device=DEVICE), out_dtype=torch.float32,
                          block_n=16, block_k=64)
    assert_close(y, reference(x, w, [2, 5]), torch.float32)


def test_int64_offsets_are_refused_with_a_message():
    x, w = problem(3, 2, torch.float32)
    with pytest.raises(ValueError, match="offs must be int32"):
        grouped_mm_triton(x, w, torch.tensor([1, 3], device=DEVICE))
