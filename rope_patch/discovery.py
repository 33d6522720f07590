"""Finding rotary classes: modeling module names (without importing them) and
the ``*RotaryEmbedding`` classes a module defines, with their static shape.

Eligibility is decided from the class itself (its forward's signature), never
from a hand-kept list; what the forward returns is checked at run time by
:mod:`rope_patch.cache`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from rope_patch.vision import VISION_REASON, is_vision

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    import torch

MODELS_PACKAGE = "transformers.models"
#: The package transformers loads remote code (trust_remote_code=True) into.
REMOTE_PACKAGE = "transformers_modules"
ROTARY_SUFFIX = "RotaryEmbedding"
#: Modeling modules for other frameworks (transformers 4.x ships TF and Flax
#: ports beside the torch ones): they define no torch module, and importing
#: them fails without TensorFlow/JAX, so they are neither hooked nor scanned.
OTHER_FRAMEWORK_PREFIXES = ("modeling_tf_", "modeling_flax_")


#: Calling conventions a table can answer.
POSITIONS = "positions"  # forward(x, position_ids[, layer_type | seq_len=None])
PREFIX = "prefix"  # forward(x, seq_len): the outputs for positions 0 .. seq_len-1


@dataclasses.dataclass(frozen=True)
class RotaryClass:
    """A ``*RotaryEmbedding`` class found in a modeling module.

    Attributes:
        cls: the class.
        model_type: the model folder's name (``qwen3``), which is what
            ROPE_PATCH_EXCLUDE and ``rope-patch list`` call the model type.
        forward: the function in the class's own ``__dict__`` (None when the
            class inherits its forward).
        convention: POSITIONS or PREFIX (None when unsupported).
        extra: the forward's parameter after position_ids: ``"layer_type"``
            (part of the table key), ``"seq_len"`` (ignored by such forwards
            in transformers 4.x; calls passing it are answered only when
            ``unread_seq_len``), or None.
        unsupported: why the forward cannot be cached, or None.
        unread_seq_len: the forward provably never reads its ``seq_len``
            parameter (rope_patch.unread): calls passing one are answered
            like calls that do not (Phi-3's remote code passes it always).
        rebuild: the name of the method that rebuilds the class's own cache
            (``_set_cos_sin_cache``) when the class follows that convention
            (rope_patch.cache.rebuild): the rebuild is answered from
            tables, the forward runs as it is.
    """

    cls: type[torch.nn.Module]
    model_type: str
    forward: Callable[..., Any] | None
    convention: str | None
    extra: str | None
    unsupported: str | None
    unread_seq_len: bool = False
    rebuild: str | None = None

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def module(self) -> str:
        return self.cls.__module__

    @property
    def takes_layer_type(self) -> bool:
        """The forward's third parameter is ``layer_type``."""
        return self.extra == "layer_type"


def models_dir() -> str | None:
    """The ``transformers/models`` folder, found without importing transformers."""
    if "transformers" in sys.modules:
        paths = getattr(sys.modules["transformers"], "__path__", None) or []
    else:
        spec = importlib.util.find_spec("transformers")
        paths = list(spec.submodule_search_locations or []) if spec else []
    for path in paths:
        candidate = os.path.join(path, "models")
        if os.path.isdir(candidate):
            return candidate
    return None


def modeling_module_names() -> list[str]:
    """Dotted names of every torch ``transformers.models.<name>.modeling_*`` module.

    Lists the folder only: nothing is imported, so this is cheap enough for
    ``import rope_patch.auto``.
    """
    root = models_dir()
    if root is None:
        return []
    names: list[str] = []
    with os.scandir(root) as models:
        for model in models:
            if not model.is_dir() or model.name.startswith(("_", ".")):
                continue
            with os.scandir(model.path) as files:
                names.extend(
                    f"{MODELS_PACKAGE}.{model.name}.{entry.name[:-3]}"
                    for entry in files
                    if entry.name.startswith("modeling_")
                    and entry.name.endswith(".py")
                    and not entry.name.startswith(OTHER_FRAMEWORK_PREFIXES)
                )
    return sorted(names)


_CLASS_LINE = re.compile(rf"^class\s+(\w*{ROTARY_SUFFIX})\b", re.MULTILINE)


def declared_rotary_names(module_name: str) -> list[str]:
    """The ``*RotaryEmbedding`` class names a modeling module's source
    declares, read from its file without importing it (so that tools can
    choose which modules to import). [] when the file cannot be read."""
    root = models_dir()
    parts = module_name.split(".")
    if root is None or len(parts) != 4:
        return []
    try:
        with open(os.path.join(root, parts[2], parts[3] + ".py"), encoding="utf-8") as source:
            return _CLASS_LINE.findall(source.read())
    except OSError:
        return []


def model_type_of(module_name: str) -> str:
    """``transformers.models.qwen3.modeling_qwen3`` -> ``qwen3``; remote code
    ``transformers_modules.<repo>.modeling_toy`` -> ``toy`` (its file's name)."""
    parts = module_name.split(".")
    if len(parts) > 3 and parts[:2] == ["transformers", "models"]:
        return parts[2]
    if parts[0] == REMOTE_PACKAGE and parts[-1].startswith("modeling_"):
        return parts[-1][len("modeling_") :]
    return module_name


def rotary_classes(module: ModuleType) -> list[RotaryClass]:
    """The ``*RotaryEmbedding`` nn.Module classes defined in ``module``.

    Classes imported from another module are skipped: they belong to the
    module that defines them.
    """
    import torch

    found = []
    for name, obj in sorted(vars(module).items()):
        if (
            name.endswith(ROTARY_SUFFIX)
            and isinstance(obj, type)
            and obj.__module__ == module.__name__
            and issubclass(obj, torch.nn.Module)
        ):
            found.append(describe(obj))
    return found


def describe(cls: type[torch.nn.Module]) -> RotaryClass:
    """Classify ``cls`` by its forward's signature. A vision rotary whose
    signature no table can answer gets VISION_REASON (the reason that
    matters); one that takes per-position ids is patched like any other."""
    from rope_patch.cache.rebuild import rebuild_method  # torch is imported: cls is a Module
    from rope_patch.unread import never_read

    forward = cls.__dict__.get("forward")
    resolved = getattr(cls, "forward", None)
    convention, extra, unsupported = _signature_shape(resolved)
    if unsupported and is_vision(cls):
        unsupported = VISION_REASON
    return RotaryClass(
        cls=cls,
        model_type=model_type_of(cls.__module__),
        forward=forward,
        convention=convention,
        extra=extra,
        unsupported=unsupported,
        unread_seq_len=extra == "seq_len" and never_read(resolved, "seq_len"),
        rebuild=rebuild_method(cls) if convention == PREFIX else None,
    )


def _signature_shape(forward) -> tuple[str | None, str | None, str | None]:
    """``(convention, extra parameter, reason if unsupported)`` for a forward.

    Supported: ``forward(self, x, position_ids)``,
    ``forward(self, x, position_ids, layer_type[=None])``,
    ``forward(self, x, position_ids, seq_len=None)`` (transformers 4.x Dbrx,
    RecurrentGemma) and ``forward(self, x, seq_len[=None])`` (4.x Phimoe,
    remote code of the cos_cached era). Decorators that use functools.wraps
    (``dynamic_rope_update``, ``torch.no_grad``) are seen through by
    inspect.signature.
    """
    if forward is None:
        return None, None, "no forward method"
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None, None, "forward has no readable signature"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in positional for p in params):
        return None, None, "forward takes *args or keyword-only arguments"
    names = [p.name for p in params[1:]]  # drop self
    shown = ", ".join(names)
    if len(names) == 2 and names[1] == "seq_len":
        return PREFIX, None, None
    if len(names) < 2 or names[1] != "position_ids":
        return None, None, f"forward({shown}) takes no (x, position_ids) pair"
    if len(names) == 2:
        return POSITIONS, None, None
    if len(names) == 3 and names[2] == "layer_type":
        return POSITIONS, "layer_type", None
    if len(names) == 3 and names[2] == "seq_len" and params[3].default is None:
        return POSITIONS, "seq_len", None
    return None, None, f"forward({shown}) takes arguments beyond (x, position_ids, layer_type)"
