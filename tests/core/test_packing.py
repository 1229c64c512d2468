"""Sign packing round-trips, and shapes that cannot be packed are refused with a clear reason."""

import pytest
import torch

from deltafleet.kernels.packing import pack_signs, unpack_bits, unpack_signs


@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (13, 96), (128, 384)])
def test_round_trip(shape):
    d = torch.randn(shape)
    d[0, 0] = 0.0  # zero maps to +1 by the documented rule
    packed = pack_signs(d)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 32)
    signs = unpack_signs(packed)
    expected = torch.where(d >= 0, 1.0, -1.0)
    assert torch.equal(signs, expected)
    assert torch.equal(unpack_bits(packed), (d >= 0).to(torch.uint8))


def test_bit_layout_is_lsb_first_along_k():
    d = -torch.ones(1, 64)
    d[0, 0] = 1.0  # bit 0 of word 0
    d[0, 63] = 1.0  # bit 31 of word 1: the sign bit of an int32
    packed = pack_signs(d)
    assert packed.tolist() == [[1, -(2**31)]]


def test_stacked_tenants_unpack():
    a, b = torch.randn(5, 64), torch.randn(5, 64)
    stacked = torch.stack([pack_signs(a), pack_signs(b)])
    assert torch.equal(unpack_signs(stacked)[1], torch.where(b >= 0, 1.0, -1.0))


@pytest.mark.parametrize(
    "shape, words",
    [((4, 33), "not a multiple of 32"), ((4, 31), "not a multiple of 32"), ((64,), "2-D"), ((0, 32), "non-empty"),
     ((2, 3, 32), "2-D")],
)
def test_odd_shapes_refused(shape, words):
    with pytest.raises(ValueError, match=words) as e:
        pack_signs(torch.randn(shape))
    assert str(tuple(shape)) in str(e.value)


def test_unpack_refuses_wrong_dtype():
    with pytest.raises(TypeError, match="int32"):
        unpack_signs(torch.zeros(2, 2, dtype=torch.int64))
