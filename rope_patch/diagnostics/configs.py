"""Which config to build a rotary class from, and what a config says.

Used by rope_patch.diagnostics.instances (building an instance) and
``rope-patch check`` (a user's config). The config classes to try come
from the rotary ``__init__``'s annotation, the config classes its modeling
module imports (closest name first) and ``CONFIG_MAPPING[model_type]``;
each default config is walked with its sub-configs and text config, ranked
for the rotary.

Public: :func:`candidate_configs`, :func:`candidate_config_classes`,
:func:`wanted_config_classes`, :func:`config_family`, :func:`rank_family`,
:func:`config_base`, :func:`is_config_class`, :func:`init_parameters`,
:func:`is_config_parameter`, :func:`rope_theta`, :func:`head_dim`.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from collections.abc import Iterator

import torch

from rope_patch.discovery import RotaryClass


def config_base() -> type:
    """transformers' config base class (``PreTrainedConfig`` in 5.x, which
    keeps ``PretrainedConfig`` as an alias; 4.x has only the latter)."""
    from transformers.configuration_utils import PretrainedConfig

    return PretrainedConfig


def is_config_class(obj) -> typing.TypeGuard[type]:
    """Whether ``obj`` is a concrete transformers config class."""
    return isinstance(obj, type) and issubclass(obj, config_base()) and obj is not config_base()


def init_parameters(cls: type[torch.nn.Module]) -> list[inspect.Parameter]:
    """The ``__init__`` parameters after ``self``, without ``*args``/``**kwargs``
    (nothing generic can be passed there)."""
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _annotation_config_classes(annotation, namespace: dict) -> list[type]:
    """Config classes named by an annotation.

    Handles classes, ``Optional``/``Union``/``X | None`` and string
    annotations (``from __future__ import annotations``), whose names are
    looked up in the defining module's ``namespace``.

    Returns:
        The config classes, in the order they appear.
    """
    if annotation is inspect.Parameter.empty or annotation is None:
        return []
    if isinstance(annotation, str):
        found = (namespace.get(word) for word in re.findall(r"[A-Za-z_]\w*", annotation))
        return [obj for obj in found if is_config_class(obj)]
    if is_config_class(annotation):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _annotation_config_classes(arg, namespace)]


def is_config_parameter(param: inspect.Parameter, namespace: dict) -> bool:
    """A parameter that takes a config: named ``config``/``*_config`` or
    annotated with a config class."""
    return (
        param.name == "config"
        or param.name.endswith("_config")
        or bool(_annotation_config_classes(param.annotation, namespace))
    )


def wanted_config_classes(cls: type[torch.nn.Module]) -> list[type]:
    """The config classes the rotary ``__init__`` is annotated with."""
    namespace = vars(sys.modules[cls.__module__])
    wanted: list[type] = []
    for param in init_parameters(cls):
        for config_cls in _annotation_config_classes(param.annotation, namespace):
            if config_cls not in wanted:
                wanted.append(config_cls)
    return wanted


def _stem(name: str, suffix: str) -> str:
    """``name`` lower-cased, without ``suffix``: the model part of a class name."""
    return (name[: -len(suffix)] if name.endswith(suffix) else name).lower()


def _name_closeness(rotary_name: str, config_cls: type) -> tuple[int, int]:
    """How well a config class's name matches a rotary class's name, larger
    is closer: ``Qwen3VLTextRotaryEmbedding`` is closest to ``Qwen3VLTextConfig``.

    Args:
        rotary_name: the rotary class's name.
        config_cls: a config class.

    Returns:
        (length of the common prefix of the two stems, minus the difference
        in stem lengths), for sorting.
    """
    a = _stem(rotary_name, "RotaryEmbedding")
    b = _stem(config_cls.__name__, "Config")
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return common, -abs(len(a) - len(b))


def _module_config_classes(rotary: RotaryClass) -> list[type]:
    """Config classes defined under the rotary's model folder that its
    modeling module imports (``from .configuration_qwen3 import Qwen3Config``)."""
    package = rotary.module.rsplit(".", 1)[0] + "."
    namespace = vars(sys.modules[rotary.module])
    return [obj for _, obj in sorted(namespace.items()) if is_config_class(obj) and obj.__module__.startswith(package)]


def _mapped_config_class(model_type: str) -> type | None:
    """``CONFIG_MAPPING``'s class for a model folder name (some keys use
    dashes where folder names use underscores)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for key in (model_type, model_type.replace("_", "-")):
        try:
            return CONFIG_MAPPING[key]
        except (KeyError, ValueError, ImportError, AttributeError):
            continue
    return None


def candidate_config_classes(rotary: RotaryClass) -> list[type]:
    """The config classes to build, best first.

    Args:
        rotary: the rotary class.

    Returns:
        The ``__init__``'s annotated classes, then the module's config classes
        by name closeness, then CONFIG_MAPPING's class for the model type;
        without repeats.
    """
    ranked = sorted(_module_config_classes(rotary), key=lambda c: _name_closeness(rotary.name, c), reverse=True)
    ordered: list[type] = []
    for config_cls in [*wanted_config_classes(rotary.cls), *ranked, _mapped_config_class(rotary.model_type)]:
        if config_cls is not None and config_cls not in ordered:
            ordered.append(config_cls)
    return ordered


def config_family(config, depth: int = 3) -> tuple[list, set[int]]:
    """``config`` and its sub-configs, breadth first, ``depth`` levels deep.

    Args:
        config: the root config.
        depth: how many levels to walk.

    Returns:
        (the configs, each once; the ids of those that another member's
        ``get_text_config()`` returned, i.e. the text sub-configs).
    """
    base = config_base()
    family, seen, text_ids, level = [], set(), set(), [config]
    for _ in range(depth):
        next_level = []
        for item in level:
            if id(item) in seen:
                continue
            seen.add(id(item))
            family.append(item)
            try:
                text = item.get_text_config()
            except Exception:  # noqa: BLE001 - not every config has a text part; some raise when asked
                text = None
            if isinstance(text, base) and text is not item:  # many configs answer themselves
                text_ids.add(id(text))
                next_level.append(text)  # first, so it is walked before the other sub-configs
            children = [getattr(item, name, None) for name in sorted(getattr(item, "sub_configs", None) or {})]
            next_level.extend(child for child in children if isinstance(child, base))
        level = next_level
    return family, text_ids


def rank_family(rotary: RotaryClass, family: list, text_ids: set[int], wanted: list[type]) -> list:
    """A config family ordered for ``rotary``.

    The annotated class itself comes first, then its subclasses, then the
    rest; within each group the closest name, then text configs (a text
    rotary annotated with its multimodal parent, as Qwen2.5-Omni's is, is
    built from the text sub-config), then the shortest name difference.
    """

    def key(config):
        kind = type(config)
        match = 0 if kind in wanted else 1 if isinstance(config, tuple(wanted)) else 2
        common, length = _name_closeness(rotary.name, kind)
        return match, -common, id(config) not in text_ids, -length

    return sorted(family, key=key)  # stable: breadth-first order breaks ties


def candidate_configs(rotary: RotaryClass, problems: list[str]) -> Iterator:
    """Default config objects to build ``rotary`` from, best first, built lazily.

    Args:
        rotary: the rotary class.
        problems: receives a line for each config class whose default
            constructor failed.

    Yields:
        Config instances, each once.
    """
    wanted = wanted_config_classes(rotary.cls)
    seen: set[int] = set()
    for config_cls in candidate_config_classes(rotary):
        try:
            config = config_cls()
        except Exception as exc:  # noqa: BLE001 - a config may require arguments; try the next one
            problems.append(f"{config_cls.__name__}() failed: {type(exc).__name__}: {exc}")
            continue
        family, text_ids = config_family(config)
        for member in rank_family(rotary, family, text_ids, wanted):
            if id(member) not in seen:
                seen.add(id(member))
                yield member


def rope_theta(config):
    """The RoPE base of a config: ``rope_theta`` (4.x) or
    ``rope_parameters["rope_theta"]`` (5.x, possibly per layer type)."""
    theta = getattr(config, "rope_theta", None)
    if theta is not None:
        return theta
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            return params["rope_theta"]
        for value in params.values():  # per-layer-type parameters: take the first
            if isinstance(value, dict) and "rope_theta" in value:
                return value["rope_theta"]
    return None


def head_dim(config):
    """The attention head size of a config (``head_dim`` or hidden size over
    heads), or None."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return head_dim
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    return hidden // heads if hidden and heads else None
