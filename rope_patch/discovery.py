"""Finding rotary classes: modeling module names (without importing them) and
the ``*RotaryEmbedding`` classes a module defines, with their static shape.

Eligibility is decided from the class itself (its forward's signature), never
from a hand-kept list; what the forward returns is checked at run time by
:mod:`rope_patch.tables`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import sys
from types import ModuleType

MODELS_PACKAGE = "transformers.models"
ROTARY_SUFFIX = "RotaryEmbedding"
#: Modeling modules for other frameworks (transformers 4.x ships TF and Flax
#: ports beside the torch ones): they define no torch module, and importing
#: them fails without TensorFlow/JAX, so they are neither hooked nor scanned.
OTHER_FRAMEWORK_PREFIXES = ("modeling_tf_", "modeling_flax_")


@dataclasses.dataclass(frozen=True)
class RotaryClass:
    """A ``*RotaryEmbedding`` class found in a modeling module.

    Attributes:
        cls: the class.
        model_type: the model folder's name (``qwen3``), which is what
            ROPE_PATCH_EXCLUDE and ``rope-patch list`` call the model type.
        forward: the function in the class's own ``__dict__`` (None when the
            class inherits its forward).
        takes_layer_type: the forward has a third ``layer_type`` parameter.
        unsupported: why the forward cannot be cached, or None.
    """

    cls: type
    model_type: str
    forward: object
    takes_layer_type: bool
    unsupported: str | None

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def module(self) -> str:
        return self.cls.__module__


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
    names = []
    with os.scandir(root) as models:
        for model in models:
            if not model.is_dir() or model.name.startswith(("_", ".")):
                continue
            with os.scandir(model.path) as files:
                for entry in files:
                    if (
                        entry.name.startswith("modeling_")
                        and entry.name.endswith(".py")
                        and not entry.name.startswith(OTHER_FRAMEWORK_PREFIXES)
                    ):
                        names.append(f"{MODELS_PACKAGE}.{model.name}.{entry.name[:-3]}")
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
    """``transformers.models.qwen3.modeling_qwen3`` -> ``qwen3``."""
    parts = module_name.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["transformers", "models"] else module_name


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


def describe(cls: type) -> RotaryClass:
    """Classify ``cls`` by its forward's signature."""
    forward = cls.__dict__.get("forward")
    takes_layer_type, unsupported = _signature_shape(getattr(cls, "forward", None))
    return RotaryClass(
        cls=cls,
        model_type=model_type_of(cls.__module__),
        forward=forward,
        takes_layer_type=takes_layer_type,
        unsupported=unsupported,
    )


def _signature_shape(forward) -> tuple[bool, str | None]:
    """``(takes_layer_type, reason_if_unsupported)`` for a forward function.

    Supported: ``forward(self, x, position_ids)`` and
    ``forward(self, x, position_ids, layer_type[=None])``; decorators that use
    functools.wraps (``dynamic_rope_update``, ``torch.no_grad``) are seen
    through by inspect.signature.
    """
    if forward is None:
        return False, "no forward method"
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False, "forward has no readable signature"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in positional for p in params):
        return False, "forward takes *args or keyword-only arguments"
    names = [p.name for p in params[1:]]  # drop self
    if len(names) < 2 or names[1] != "position_ids":
        shown = ", ".join(names)
        return False, f"forward({shown}) takes no (x, position_ids) pair"
    if len(names) == 2:
        return False, None
    if len(names) == 3 and names[2] == "layer_type":
        return True, None
    return False, f"forward({', '.join(names)}) takes arguments beyond (x, position_ids, layer_type)"
