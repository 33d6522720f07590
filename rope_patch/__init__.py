"""rope_patch: answer every transformers ``*RotaryEmbedding`` forward from
lazily built cos/sin tables, bit-identical to the unpatched model.

Use ``import rope_patch.auto`` (patch everything, honouring the ROPE_PATCH_*
environment variables) or the API below.
"""

from rope_patch.info import CacheInfo, TableInfo
from rope_patch.patching import disabled, is_patched, patch, patch_class, status, unpatch
from rope_patch.status import ClassStatus, Status

__version__ = "0.2.0"


def cache_info(module) -> CacheInfo:
    """The tables rope_patch holds for ``module`` (a rotary embedding
    instance), their sizes and bytes, and why it is computed unpatched if it
    is. A module that has not run a patched forward holds nothing."""
    from rope_patch import cache  # imports torch: only when asked

    return cache.cache_info(module)


__all__ = [
    "CacheInfo",
    "ClassStatus",
    "Status",
    "TableInfo",
    "__version__",
    "cache_info",
    "disabled",
    "is_patched",
    "patch",
    "patch_class",
    "status",
    "unpatch",
]
