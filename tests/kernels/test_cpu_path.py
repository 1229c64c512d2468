"""The CPU path of `delta_linear` (what the dispatcher runs without CUDA) against the reference:
the native bit kernel (cpu_native.py) and the torch-ops fallback, both."""

import warnings

import pytest
import torch

from kernel_cases import MIXES, problem, tenant_rows

from deltafleet.kernels import BASE_SLOT, SignCache, delta_linear, delta_linear_reference, group_rows, unpack_signs
from deltafleet.kernels import cpu, cpu_native
from deltafleet.kernels.cpu import signed_dot_lut, unpack_signs_fast

N, K = 48, 96


@pytest.fixture(params=["native", "torch"])
def cpu_kernel(request, monkeypatch):
    """Run a test on the native kernel and on the torch-ops fallback (no C compiler)."""
    if request.param == "torch":
        monkeypatch.setattr(cpu.cpu_native, "load", lambda: None)
    elif cpu_native.load() is None:
        pytest.skip("no C compiler here: the native CPU kernel is not built")
    return request.param


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setattr(cpu.cpu_native, "load", lambda: None)


def check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (y.float() - ref).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1.0), f"max error {err}"


@pytest.mark.parametrize("cache", [False, True], ids=["cold", "cached"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-matrix", "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_cpu_path_matches_reference(mix, dtype, per_row, cache, cpu_kernel):
    gen = torch.Generator().manual_seed(hash((mix, per_row, str(dtype))) % 2**31)
    t, rows = tenant_rows(mix, gen)
    x, w, signs, scales = problem(t, rows.numel(), N, K, dtype, per_row, gen)
    ref = delta_linear_reference(x, w, signs, scales, rows)
    y = delta_linear(x, w, signs, scales, rows, sign_cache=SignCache(1 << 24) if cache else None)
    check(y, ref, dtype)


@pytest.mark.parametrize("m", [1, cpu.LUT_MAX_ROWS, cpu.LUT_MAX_ROWS + 1, 9])
def test_lut_and_unpack_agree_across_the_row_threshold(m, torch_path):
    gen = torch.Generator().manual_seed(m)
    x, w, signs, scales = problem(1, m, N, K, torch.float32, False, gen)
    exact = x @ unpack_signs(signs[0]).t()
    torch.testing.assert_close(signed_dot_lut(x, signs[0]), exact, rtol=1e-5, atol=1e-4)
    ref = delta_linear_reference(x, w, signs, scales, torch.zeros(m, dtype=torch.long))
    check(delta_linear(x, w, signs, scales, torch.zeros(m, dtype=torch.long)), ref, torch.float32)


def test_byte_table_unpack_matches_the_layout():
    packed = torch.randint(-(2**31), 2**31 - 1, (5, 4), dtype=torch.int32)
    assert torch.equal(unpack_signs_fast(packed), unpack_signs(packed))


def test_non_contiguous_inputs_on_cpu(cpu_kernel):
    gen = torch.Generator().manual_seed(1)
    t, rows = tenant_rows("uniform", gen)
    x, w, signs, scales = problem(2 * t, rows.numel(), N, K, torch.float32, True, gen)
    ref = delta_linear_reference(x, w, signs[::2].contiguous(), scales[::2].contiguous(), rows)
    y = delta_linear(x.t().contiguous().t(), w.t().contiguous().t(), signs[::2], scales[::2], rows)
    check(y, ref, torch.float32)


def test_precomputed_groups_give_the_same_result(cpu_kernel):
    gen = torch.Generator().manual_seed(2)
    t, rows = tenant_rows("zipf", gen)
    x, w, signs, scales = problem(t, rows.numel(), N, K, torch.float32, False, gen)
    groups = group_rows(rows, t)
    assert torch.equal(delta_linear(x, w, signs, scales, rows, groups=groups), delta_linear(x, w, signs, scales, rows))


def test_groups_built_for_a_bigger_stack_are_refused():
    gen = torch.Generator().manual_seed(3)
    x, w, signs, scales = problem(2, 3, N, K, torch.float32, False, gen)
    rows = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match="groups name slot 3, but the signs stack has 2 slots"):
        delta_linear(x, w, signs, scales, torch.tensor([0, 1, 1]), groups=group_rows(rows, 4))


def test_sign_cache_hits_and_never_serves_a_stale_tenant(torch_path):
    gen = torch.Generator().manual_seed(4)
    x, w, signs, scales = problem(2, 3, N, K, torch.float32, False, gen)
    rows = torch.tensor([0, 1, 0])
    cache = SignCache(1 << 24)
    delta_linear(x, w, signs, scales, rows, sign_cache=cache)
    delta_linear(x, w, signs, scales, rows, sign_cache=cache)
    assert (cache.misses, cache.hits) == (2, 2)
    signs[1] = ~signs[1]  # a new tenant loaded into slot 1, in place
    ref = delta_linear_reference(x, w, signs, scales, rows)
    check(delta_linear(x, w, signs, scales, rows, sign_cache=cache), ref, torch.float32)


def test_sign_cache_stays_within_its_byte_budget(torch_path):
    gen = torch.Generator().manual_seed(5)
    x, w, signs, scales = problem(4, 4, N, K, torch.float32, False, gen)
    one = N * K * 4
    cache = SignCache(2 * one)
    delta_linear(x, w, signs, scales, torch.arange(4), sign_cache=cache)
    assert cache.bytes == 2 * one and cache.misses == 4


@pytest.mark.parametrize("n, k", [(1, 32), (3, 64), (17, 96), (33, 160), (64, 224), (40, 512), (5, 1056)])
@pytest.mark.parametrize("rows_per_tenant", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-matrix", "per-row"])
def test_native_kernel_across_shapes(n, k, rows_per_tenant, per_row, cpu_kernel):
    """K with an odd number of words and chunk counts that are not a multiple of 4, N tails,
    segments of 1..9 rows (the kernel takes rows 4 at a time), base rows mixed in, rows shuffled."""
    gen = torch.Generator().manual_seed(n * 1000 + k + rows_per_tenant)
    t = 5
    rows = torch.arange(t).repeat_interleave(rows_per_tenant)
    rows = torch.cat([rows, torch.full((2,), -1)])[torch.randperm(t * rows_per_tenant + 2, generator=gen)]
    x, w, signs, scales = problem(t, rows.numel(), n, k, torch.float32, per_row, gen)
    ref = delta_linear_reference(x, w, signs, scales, rows)
    check(delta_linear(x, w, signs, scales, rows), ref, torch.float32)


def test_many_tenants_one_row_each_and_a_large_k(cpu_kernel):
    gen = torch.Generator().manual_seed(6)
    t = 70
    rows = torch.cat([torch.randperm(t, generator=gen), torch.tensor([-1, 3, -1])])
    x, w, signs, scales = problem(t, rows.numel(), 24, 2048, torch.float32, False, gen)
    ref = delta_linear_reference(x, w, signs, scales, rows)
    check(delta_linear(x, w, signs, scales, rows), ref, torch.float32)


def test_only_base_rows_and_no_rows(cpu_kernel):
    gen = torch.Generator().manual_seed(7)
    x, w, signs, scales = problem(2, 3, N, K, torch.float32, False, gen)
    rows = torch.full((3,), -1)
    torch.testing.assert_close(delta_linear(x, w, signs, scales, rows), x @ w.t())
    assert delta_linear(x[:0], w, signs, scales, rows[:0]).shape == (0, N)


def test_native_kernel_is_refused_quietly_when_it_cannot_be_built(monkeypatch, tmp_path):
    """A machine without a working compiler serves through torch ops, with one warning."""
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setenv("DELTAFLEET_CPU_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="native CPU delta kernel is unavailable"):
        assert cpu_native.load() is None
    gen = torch.Generator().manual_seed(8)
    x, w, signs, scales = problem(2, 3, N, K, torch.float32, False, gen)
    rows = torch.tensor([0, 1, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        check(delta_linear(x, w, signs, scales, rows), delta_linear_reference(x, w, signs, scales, rows), torch.float32)


def test_gradients_still_flow_on_cpu(cpu_kernel):
    """The native kernel is outside autograd, so a call that needs gradients takes torch ops."""
    gen = torch.Generator().manual_seed(9)
    x, w, signs, scales = problem(3, 5, N, K, torch.float32, True, gen)
    rows = torch.tensor([0, 2, -1, 1, 2])
    got, want = scales.clone().requires_grad_(), scales.clone().requires_grad_()
    delta_linear(x, w, signs, got, rows).square().sum().backward()
    delta_linear_reference(x, w, signs, want, rows).square().sum().backward()
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)


def test_native_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setenv("DELTAFLEET_CPU_KERNEL", "torch")
    assert cpu_native.load() is None


def test_grouping_is_a_stable_sort_into_segments():
    g = group_rows(torch.tensor([2, -1, 0, 2, 0, -1]), 3)
    assert g.slots == (-1, 0, 2)
    assert g.starts == (0, 2, 4, 6)
    assert g.order.tolist() == [1, 5, 2, 4, 0, 3]
    assert g.max_rows == 2 and g.num_segments == 3


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(slot_of_row=torch.tensor([0, 3, 0])), IndexError, r"slot 3, outside \[-1, 3\)"),
        (dict(slot_of_row=torch.tensor([0, -2, 0])), IndexError, r"slot -2, outside \[-1, 3\)"),
        (dict(slot_of_row=torch.tensor([0.0, 1.0, 0.0])), TypeError, "integer tensor"),
        (dict(slot_of_row=torch.tensor([0, 1])), ValueError, r"slot_of_row must be \[M=3\]"),
        (dict(x=torch.randn(3, 40), base_weight=torch.randn(8, 40)), ValueError, "K=40 is not a multiple of 32"),
        (dict(base_weight=torch.randn(8, 64).half()), TypeError, "dtype mismatch: x is torch.float32 but base_weight is torch.float16"),
        (dict(x=torch.randn(3, 64).double(), base_weight=torch.randn(8, 64).double()), TypeError, "float16, bfloat16 or float32"),
        (dict(signs=torch.zeros(3, 8, 2)), TypeError, "packed int32"),
        (dict(signs=torch.zeros(3, 9, 2, dtype=torch.int32)), ValueError, r"base_weight is \[N=8, K=64\] but x has K=64 and signs N=9"),
        (dict(signs=torch.zeros(3, 8, 3, dtype=torch.int32)), ValueError, r"signs must be \[T, N, K/32=2\]"),
        (dict(scales=torch.ones(2)), ValueError, r"scales must be \[T=3\] or \[T=3, N=8\]"),
        (dict(scales=torch.ones(3, dtype=torch.int64)), TypeError, "scales must be floating point"),
        (dict(x=torch.randn(3, 64, device="meta")), ValueError, "device mismatch"),
    ],
)
def test_bad_arguments_get_one_clear_error(change, error, match):
    args = dict(
        x=torch.randn(3, 64),
        base_weight=torch.randn(8, 64),
        signs=torch.zeros(3, 8, 2, dtype=torch.int32),
        scales=torch.ones(3),
        slot_of_row=torch.tensor([0, 1, BASE_SLOT]),
    )
    args.update(change)
    with pytest.raises(error, match=match):
        delta_linear(**args)


@pytest.mark.parametrize("broken, match", [
    ("row", "row index in order is outside"),
    ("slot", "outside the stack of 2"),
    ("starts", "do not split 4 rows"),
    ("rows", "groups for 3 rows, x has 4"),
    ("signs", "do not fit"),
])
def test_the_c_kernel_refuses_what_would_make_it_read_or_write_out_of_bounds(broken, match):
    """The C code indexes memory with these and checks nothing itself: a bad grouping or shape
    must raise before the call, never reach it."""
    from dataclasses import replace

    lib = cpu_native.load()
    if lib is None:
        pytest.skip("no C compiler here: the native CPU kernel is not built")
    gen = torch.Generator().manual_seed(7)
    rows = torch.tensor([0, 1, -1, 0])
    x, w, signs, scales = problem(2, rows.numel(), N, K, torch.float32, False, gen)
    g = group_rows(rows, 2)
    if broken == "row":
        order = g.order.clone()
        order[0] = x.shape[0]  # one past the last row
        g = replace(g, order=order)
    elif broken == "slot":
        g = replace(g, seg_slot=torch.tensor([*g.slots[:-1], 2], dtype=torch.int32), slots=(*g.slots[:-1], 2))
    elif broken == "starts":
        g = replace(g, seg_start=torch.tensor([0, 1, 5, 4], dtype=torch.int32), starts=(0, 1, 5, 4))
    elif broken == "rows":
        g = group_rows(rows[:3], 2)
    else:
        signs = signs[:, :, :-1].contiguous()  # K/32 - 1 words for K columns
    y = torch.zeros(x.shape[0], N)
    with pytest.raises(ValueError, match=match):
        cpu_native.delta_accumulate(lib, y, x, signs, scales.float(), g)
    assert not y.any()  # nothing was written
