"""The comparison all other tests rely on must catch every kind of difference."""

import torch

from rope_patch.identity import difference


def test_identical_tensors_and_tuples_pass():
    a = torch.randn(2, 3, 4)
    assert difference(a, a.clone()) is None
    assert difference((a, a), (a.clone(), a.clone())) is None


def test_catches_dtype_shape_strides_values_and_type():
    a = torch.randn(2, 3, 4)
    assert "dtype" in difference(a, a.double())
    assert "shape" in difference(a, a[:1])
    transposed = a.transpose(0, 1).contiguous().transpose(0, 1)
    assert "strides" in difference(a, transposed)
    b = a.clone()
    b[1, 2, 3] += 1e-6
    assert "values" in difference(a, b)
    assert "returned" in difference((a, a), [a, a])
    assert "outputs" in difference((a, a), (a,))


def test_negative_zero_and_nan_bits():
    zero = torch.zeros(3)
    assert "values" in difference(zero, -zero)
    nan = torch.full((2,), float("nan"))
    assert difference(nan, nan.clone()) is None


def test_complex_and_bfloat16():
    c = torch.polar(torch.ones(4), torch.randn(4))
    assert difference(c, c.clone()) is None
    d = c.clone()
    d[0] = d[0] * 1.0000001 + 1e-6
    assert difference(c, d) is not None
    h = torch.randn(5).bfloat16()
    assert difference(h, h.clone()) is None
    assert difference(h, h.float()) is not None
