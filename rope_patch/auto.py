"""``import rope_patch.auto`` patches every transformers rotary embedding.

Modeling modules are patched as they are imported (nothing is imported here).
ROPE_PATCH_DISABLE=1 makes this a no-op; ROPE_PATCH_EXCLUDE lists model types
or classes to leave alone. Missing or unsupported torch/transformers: a warning
and nothing else.
"""

from rope_patch.patching import patch

patch()
