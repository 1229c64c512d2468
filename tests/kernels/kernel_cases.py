"""Small problems shared by the kernel tests: tenant popularity mixes and random deltas."""

import torch

from deltafleet.kernels import pack_signs

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 8e-3}  # the output's rounding


def assert_close(y, ref, dtype):
    """y (a kernel's output, `dtype`) within TOL of ref (fp32), relative to ref's largest entry."""
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float().cpu() - ref.cpu()).abs().max().item()
    assert err <= TOL[dtype] * max(ref.abs().max().item(), 1.0), f"max error {err}"


# name -> (number of tenants T, rows M); odd row counts on purpose.
MIXES = {
    "distinct": (13, 13),  # every row its own tenant (decode across a fleet)
    "uniform": (4, 21),
    "zipf": (8, 37),  # one hot tenant with more rows than a row tile
    "identical": (4, 37),  # a big stack, one tenant used
    "single": (1, 19),  # one tenant, one segment (the fused path)
    "single-row": (1, 1),  # batch-1 decode of one tenant
}


def tenant_rows(mix: str, gen: torch.Generator, base_rows: bool = True) -> tuple[int, torch.Tensor]:
    t, m = MIXES[mix]
    if mix == "distinct":
        rows = torch.randperm(m, generator=gen)
    elif mix == "uniform":
        rows = torch.randint(0, t, (m,), generator=gen)
    elif mix == "zipf":
        p = 1.0 / torch.arange(1, t + 1).float() ** 1.2
        rows = torch.multinomial(p, m, replacement=True, generator=gen)
    elif mix == "identical":
        rows = torch.full((m,), 2)
    else:
        rows = torch.zeros(m, dtype=torch.long)
    if base_rows and not mix.startswith("single"):
        rows[1::5] = -1  # the base model is a tenant too
    return t, rows


def problem(t: int, m: int, n: int, k: int, dtype: torch.dtype, per_row: bool, gen: torch.Generator, device="cpu"):
    """x [M, K], W [N, K], signs [T, N, K/32], scales [T] or [T, N], with deltas ~ base / 5.

    Off the CPU the data is drawn on the device (a generator seeded from `gen`): at 7B shapes
    and 64 tenants that is billions of normals, minutes single-threaded on a host."""
    if torch.device(device).type != "cpu":
        gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    dev = gen.device
    x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=dev) / k**0.5).to(dtype)
    signs = torch.stack([pack_signs(torch.randn(n, k, generator=gen, device=dev)) for _ in range(t)])
    shape = (t, n) if per_row else (t,)
    scales = (torch.rand(shape, generator=gen, device=dev) + 0.5) * 0.2 / k**0.5
    return x.to(device), w.to(device), signs.to(device), scales.to(device)
