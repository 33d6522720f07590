"""rope_patch: answer every transformers ``*RotaryEmbedding`` forward from
lazily built cos/sin tables, bit-identical to the unpatched model.

Use ``import rope_patch.auto`` (patch everything, honouring the ROPE_PATCH_*
environment variables) or the API below.
"""

from rope_patch.patching import ClassStatus, disabled, is_patched, patch, status, unpatch

__version__ = "0.1.0"

__all__ = ["ClassStatus", "__version__", "disabled", "is_patched", "patch", "status", "unpatch"]
