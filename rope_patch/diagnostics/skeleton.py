"""The rotary modules a model holds, found by building the model from its
config on the meta device (no memory, no weights, nothing computed).

``rope-patch check`` reports these classes, and only these: a remote
DeepSeek-V3 whose ``model_type`` is also a native one holds no native
rotary, and a remote file's classes the config does not select are not
instantiated. Each class comes with the paths of its modules and the
arguments the model passed to the first one's ``__init__`` (recorded on a
second meta build), so that the instance checked is built as the model
builds it.
"""

from __future__ import annotations

import dataclasses

import torch

from rope_patch.discovery import ROTARY_SUFFIX

#: auto_map entries tried for the model class, in this order (then any other Auto*).
MODEL_ENTRIES = ("AutoModelForCausalLM", "AutoModel", "AutoModelForImageTextToText", "AutoModelForSeq2SeqLM")
#: auto_map entries that name no model.
NOT_MODELS = ("AutoConfig", "AutoTokenizer", "AutoProcessor", "AutoImageProcessor", "AutoFeatureExtractor")


class SkeletonError(Exception):
    """The model could not be built on the meta device; the message says why."""


@dataclasses.dataclass
class Held:
    """A rotary class the model instantiates.

    Attributes:
        cls: the class.
        paths: the module paths holding an instance (``model.layers.0.self_attn.rotary_emb``).
        arguments: ``(args, kwargs)`` of the first instance's ``__init__``, or None.
    """

    cls: type[torch.nn.Module]
    paths: list[str]
    arguments: tuple | None = None

    def build(self, device):
        """A new instance on ``device``, built with the model's arguments;
        None when there are none or they do not build one."""
        if self.arguments is None:
            return None
        args, kwargs = self.arguments
        args = tuple(_on(value, device) for value in args)
        kwargs = {name: _on(value, device) for name, value in kwargs.items()}
        try:
            return self.cls(*args, **kwargs).to(device).eval()
        except Exception:  # noqa: BLE001 - not buildable from them: the caller builds it from the config
            return None


def _on(value, device):
    """A device argument the meta build saw, moved to ``device``."""
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device(device)
    return value


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a local folder, or a Hub model id at
    ``revision`` (None: the default branch)."""

    location: str
    revision: str | None = None

    def remote_class(self, reference: str):
        """The class an ``auto_map`` reference names, loaded as transformers loads it."""
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(reference, self.location, revision=self.revision)


def model_class(config, source: ModelSource, trust_remote_code: bool):
    """The model class of ``config``: its remote code's (``auto_map``) when
    trusted, else transformers' base model for its model type; None."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        names = [name for name in MODEL_ENTRIES if name in auto_map]
        names += [name for name in auto_map if name.startswith("AutoModel") and name not in names]
        for name in names:
            reference = auto_map[name]
            if isinstance(reference, str) and name not in NOT_MODELS:
                return source.remote_class(reference)
    return base_model_class(getattr(config, "model_type", None))


def base_model_class(model_type: str | None):
    """transformers' base model class for ``model_type``, or None."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = MODEL_MAPPING_NAMES.get(model_type or "")
    if not names:
        return None
    # A class name, or (Funnel) a tuple of them: the first is the model's own.
    name = names if isinstance(names, str) else names[0]
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


def held_rotaries(cls, config) -> list[Held]:
    """Every ``*RotaryEmbedding`` class an instance of ``cls`` built from
    ``config`` holds, in the order met.

    Raises:
        SkeletonError: the model cannot be built on the meta device.
    """
    model = _meta_model(cls, config)
    found: dict[type, Held] = {}
    for path, module in model.named_modules():
        kind = type(module)
        if kind.__name__.endswith(ROTARY_SUFFIX):
            found.setdefault(kind, Held(kind, [])).paths.append(path)
    if found:
        arguments = _recorded_arguments(cls, config, list(found))
        for held in found.values():
            held.arguments = arguments.get(held.cls)
    return list(found.values())


def _meta_model(cls, config):
    try:
        with torch.device("meta"):
            build = getattr(cls, "_from_config", None)
            return build(config) if build is not None else cls(config)
    except Exception as error:  # any model code can fail here: reported, not raised
        raise SkeletonError(f"{type(error).__name__}: {error}") from error


def _recorded_arguments(cls, config, classes: list[type]) -> dict[type, tuple]:
    """class -> ``(args, kwargs)`` of its first instance's outermost
    ``__init__`` call, recorded on a second meta build."""
    first: dict[type, tuple] = {}
    seen: set[int] = set()
    saved = {kind: kind.__dict__.get("__init__") for kind in classes}

    def recording(kind, init):
        def __init__(self, *args, **kwargs):
            if id(self) not in seen and type(self) is kind:
                seen.add(id(self))
                first.setdefault(kind, (args, dict(kwargs)))
            return init(self, *args, **kwargs)

        return __init__

    # Wrapping each class's own __init__ for the second build is the point.
    for kind in classes:
        kind.__init__ = recording(kind, kind.__init__)  # type: ignore[misc]
    try:
        _meta_model(cls, config)
    except SkeletonError:
        return {}
    finally:
        for kind, init in saved.items():
            if init is None:
                del kind.__init__  # type: ignore[misc]
            else:
                kind.__init__ = init  # type: ignore[misc]
    return first
