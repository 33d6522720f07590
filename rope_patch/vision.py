"""Vision rotaries: which classes are, and why they are not answered from tables.

One fact read at two levels: discovery gives an unsupported vision class this
reason, and the table engine gives it to a vision rotary whose outputs turn
out not to be per-position (so both say the same thing). It lives below both.

Public: :data:`VISION_REASON`, :func:`is_vision`.
"""

from __future__ import annotations

import re

#: Why vision rotaries on per-patch coordinates are not answered from tables
#: (measured by benchmarks/bench_vision.py).
VISION_REASON = (
    "vision rotary on per-patch coordinates, called once per image forward: a table would save "
    "~0.001% of the vision forward (Qwen2.5-VL-shaped tower), nothing to gain"
)
_VISION_NAME = re.compile(r"vision(?!text)|vit(?=rotary)", re.IGNORECASE)


def is_vision(cls: type) -> bool:
    """The class name says it is a vision rotary (Vision, ViT; not VisionText)."""
    return bool(_VISION_NAME.search(cls.__name__))


__all__ = ["VISION_REASON", "is_vision"]
