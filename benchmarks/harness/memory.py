"""Table memory: bytes one rotary module's tables hold after real use,
against the bytes of the positions used and the eager approach of
transformers PR #45748 (max_position_embeddings x head_dim x 2 x fp32)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

import rope_patch
from harness.common import MODEL_TYPES, as_dtype, dtype_name, model_config, rotary_class
from rope_patch.diagnostics.latency import ensure_patched


@dataclasses.dataclass
class MemoryRow:
    """Bytes held by one module's tables after using positions ``0..used-1``.

    Attributes:
        model_type, dtype: what was measured.
        used: positions used (a prefill of ``used`` tokens, then one decode step).
        table_bytes: ``rope_patch.cache_info(module).bytes`` afterwards.
        used_bytes: bytes of exactly the positions used (used x width x element size).
        eager_bytes: max_position_embeddings x head_dim x 2 tables x fp32.
        max_position_embeddings: of the config.
    """

    model_type: str
    dtype: str
    used: int
    table_bytes: int
    used_bytes: int
    eager_bytes: int
    max_position_embeddings: int

    @property
    def over_used(self) -> float:
        return self.table_bytes / self.used_bytes


def table_memory(
    model_types: Iterable[str] = MODEL_TYPES,
    used: Iterable[int] = (2048, 32768),
    dtypes: Iterable = (torch.bfloat16, torch.float32),
    device="cpu",
    progress: Callable[[str], None] | None = None,
) -> list[MemoryRow]:
    """Table bytes after a prefill of ``used`` positions and one decode step,
    each on a fresh module."""
    device = torch.device(device)
    rows = []
    with ensure_patched(), torch.no_grad():
        for model_type in model_types:
            config = model_config(model_type)
            cls = rotary_class(model_type)
            for dtype in map(as_dtype, dtypes):
                for count in used:
                    module = cls(config).to(device).eval()
                    x = torch.zeros(1, 1, 8, device=device, dtype=dtype)
                    out = module(x, torch.arange(count, device=device)[None])
                    module(x, torch.tensor([[count - 1]], device=device))
                    width = sum(t.shape[-1] for t in out)
                    element = torch.empty((), dtype=dtype).element_size()
                    max_positions = config.max_position_embeddings
                    rows.append(
                        MemoryRow(
                            model_type=model_type,
                            dtype=dtype_name(dtype),
                            used=count,
                            table_bytes=rope_patch.cache_info(module).bytes,
                            used_bytes=count * width * element,
                            eager_bytes=max_positions * out[0].shape[-1] * 2 * 4,
                            max_position_embeddings=max_positions,
                        )
                    )
                    if progress:
                        progress(f"memory {model_type} {dtype_name(dtype)} {count}: {rows[-1].table_bytes} bytes")
                    del module, out
    return rows
