"""What "bit-identical" means, in one place: same type and structure, and for
every tensor the same dtype, shape, device, strides and bits."""

from __future__ import annotations

from typing import cast

import torch

#: Integer dtype of each element size, to compare floats bit for bit.
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of the same width, so that -0.0 and
    0.0 differ and equal NaN payloads compare equal."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if tensor.is_floating_point():
        return tensor.view(INT_OF_SIZE[tensor.element_size()])
    return tensor


def tensor_difference(expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    """Why ``actual`` is not a bit-identical stand-in for ``expected``, or None."""
    for attribute in ("dtype", "shape", "device"):
        want, got = getattr(expected, attribute), getattr(actual, attribute)
        if want != got:
            return f"{attribute} {got} instead of {want}"
    if expected.stride() != actual.stride():
        return f"strides {actual.stride()} instead of {expected.stride()}"
    if expected.is_meta:  # no values to compare
        return None
    if not torch.equal(bits(expected), bits(actual)):
        return "values differ"
    return None


def difference(expected: object, actual: object) -> str | None:
    """Why ``actual`` differs from ``expected`` (a tensor or a tuple/list of
    tensors, as rotary forwards return), or None when bit-identical."""
    if type(expected) is not type(actual):
        return f"returned {type(actual).__name__} instead of {type(expected).__name__}"
    # From here ``actual`` is of ``expected``'s type (checked above).
    if isinstance(expected, torch.Tensor):
        return tensor_difference(expected, cast(torch.Tensor, actual))
    if isinstance(expected, (tuple, list)):
        actual = cast("tuple | list", actual)
        if len(expected) != len(actual):
            return f"returned {len(actual)} outputs instead of {len(expected)}"
        for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
            problem = difference(want, got)
            if problem:
                return f"output {index}: {problem}"
        return None
    return None if expected == actual else "outputs differ"
