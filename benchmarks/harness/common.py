"""Shared by the benchmark scripts: dtype names, the benchmark models, and
per-call latency of a benchmark model's rotary by model type."""

from __future__ import annotations

import os

import torch

from rope_patch.cli.bench import MODELS, build_rotary, model_config, rotary_class
from rope_patch.diagnostics import latency

#: The repository root (``benchmarks/..``).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_TYPES = tuple(MODELS)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def as_dtype(dtype) -> torch.dtype:
    """``torch.bfloat16`` or a name (``"bf16"``, ``"fp32"``...) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``."""
    return _NAMES.get(as_dtype(dtype), str(dtype))


def forward_latency(model_type: str, device="cpu", dtype=torch.bfloat16, shapes=latency.DEFAULT_SHAPES, **kwargs):
    """:func:`rope_patch.diagnostics.latency.measure` on a fresh rotary of
    benchmark model ``model_type`` (rows labelled with the model type);
    ``kwargs`` go to ``measure``."""
    with latency.ensure_patched():
        module = build_rotary(model_type, device)
        return latency.measure(module, as_dtype(dtype), shapes, label=model_type, **kwargs)


__all__ = [
    "MODELS",
    "MODEL_TYPES",
    "REPO",
    "as_dtype",
    "build_rotary",
    "dtype_name",
    "forward_latency",
    "model_config",
    "rotary_class",
]
