"""Building an instance of a rotary class from its model's default config.

Used by the verifier (rope_patch.diagnostics.verify) behind the contract test,
``rope-patch list`` and the GPU check, so all of them build the same
instances. Building is data-driven, never a per-model table:

1. the config classes to try come from the rotary ``__init__``'s annotation
   (``config: Qwen3Config``), then from the config classes the modeling module
   imports (closest name first), then from ``CONFIG_MAPPING[model_type]``;
2. each is built with its default constructor, and it and its sub-configs
   (``sub_configs``, ``get_text_config()``) are tried in turn, the annotated
   class and the closest name first;
3. the ``__init__``'s parameters are filled by name: a config parameter gets
   the config, ``device`` the device, ``dim``/``base``/``theta`` values read
   from the config, others a same-named config attribute or their default;
4. two repairs, both for default configs their own models cannot run
   either, and only when nothing else works: empty RoPE parameters get
   standard RoPE (:func:`with_standard_rope`), and an ``mrope_section`` that
   is missing or does not sum to the rotary's frequency count is rescaled
   to it (:func:`with_matching_mrope_section`). The instance says which.

For dimension-style constructors (``dim``, ``theta``) the instance gets the
config's head size, not necessarily the slice the model itself passes (vision
rotaries use half of it): the instance is for exercising the class, not for
reproducing a model's numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import re
import sys
import typing
from collections.abc import Iterator

import torch

from rope_patch.discovery import PREFIX, RotaryClass, describe
from rope_patch.forward import original_of

logger = logging.getLogger(__name__)

#: Inputs of the probe forward: a (batch, seq, hidden) activation and 2-D
#: position ids, the shapes a decoder's rotary embedding is called with.
PROBE_SHAPE = (1, 4, 8)
PROBE_POSITIONS = 4
#: Rows of multimodal-RoPE position ids (temporal, height, width).
MROPE_AXES = 3

#: Constructor parameters read from the config under another name.
_THETA_NAMES = ("base", "theta", "rope_theta")
_DIM_NAMES = ("dim", "head_dim")


class InstantiationError(Exception):
    """A rotary class could not be built from its default config; the message
    says why (every config tried, with the error each gave)."""


def _config_base() -> type:
    """transformers' config base class (``PreTrainedConfig`` in 5.x, which
    keeps ``PretrainedConfig`` as an alias; 4.x has only the latter)."""
    from transformers.configuration_utils import PretrainedConfig

    return PretrainedConfig


def _is_config_class(obj) -> typing.TypeGuard[type]:
    """Whether ``obj`` is a concrete transformers config class."""
    return isinstance(obj, type) and issubclass(obj, _config_base()) and obj is not _config_base()


def _init_parameters(cls: type[torch.nn.Module]) -> list[inspect.Parameter]:
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
        return [obj for obj in found if _is_config_class(obj)]
    if _is_config_class(annotation):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _annotation_config_classes(arg, namespace)]


def _is_config_parameter(param: inspect.Parameter, namespace: dict) -> bool:
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
    for param in _init_parameters(cls):
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
    return [obj for _, obj in sorted(namespace.items()) if _is_config_class(obj) and obj.__module__.startswith(package)]


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
    base = _config_base()
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


def _rope_theta(config):
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


def _head_dim(config):
    """The attention head size of a config (``head_dim`` or hidden size over
    heads), or None."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return head_dim
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    return hidden // heads if hidden and heads else None


class _NoValue(Exception):
    """A required constructor parameter has no source in this config."""


def constructor_arguments(cls: type[torch.nn.Module], config, device) -> dict:
    """Keyword arguments for ``cls(**kwargs)`` from one config.

    Args:
        cls: the rotary class.
        config: a config instance.
        device: passed to a ``device`` parameter.

    Returns:
        The arguments; optional parameters with no value in the config are
        left out so they take their defaults.

    Raises:
        _NoValue: a required parameter cannot be filled.
    """
    namespace = vars(sys.modules[cls.__module__])
    kwargs = {}
    for param in _init_parameters(cls):
        if _is_config_parameter(param, namespace):
            value = config
        elif param.name == "device":
            value = device
        elif param.name in _DIM_NAMES:
            value = _head_dim(config)
        elif param.name in _THETA_NAMES:
            value = _rope_theta(config)
        else:
            value = getattr(config, param.name, None)
        if value is not None:
            kwargs[param.name] = value
        elif param.default is inspect.Parameter.empty:
            raise _NoValue(f"no value for required parameter {param.name!r}")
    return kwargs


#: Standard RoPE (``rope_type`` "default", base 10000: transformers' own
#: defaults), used only to repair a default config that declares RoPE
#: parameters but leaves them empty, which its own model cannot be built from
#: either: CohereCompassTextConfig (5.x, ``rope_parameters == {}``),
#: MllamaTextConfig and Qwen3VLTextConfig (4.57, ``rope_scaling is None``).
STANDARD_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def with_standard_rope(config, per_layer_type: bool):
    """A copy of ``config`` with STANDARD_ROPE filled into its empty RoPE
    parameters, or None when it has some already or declares none.

    Args:
        config: a config instance.
        per_layer_type: the rotary reads ``rope_parameters[layer_type]`` (5.x),
            so the parameters are filled per entry of ``config.layer_types``.

    Returns:
        The repaired copy, or None. In 5.x the parameters live in
        ``rope_parameters`` (``rope_scaling`` is an alias of it); in 4.x the
        type lives in ``rope_scaling`` and the base in ``rope_theta``.
    """
    if hasattr(config, "rope_parameters"):
        if config.rope_parameters:
            return None
        repaired = copy.deepcopy(config)
        layer_types = getattr(config, "layer_types", None)
        if per_layer_type and layer_types:
            repaired.rope_parameters = {layer: dict(STANDARD_ROPE) for layer in set(layer_types)}
        else:
            repaired.rope_parameters = dict(STANDARD_ROPE)
        return repaired
    if not hasattr(config, "rope_scaling") or config.rope_scaling is not None:
        return None
    repaired = copy.deepcopy(config)
    repaired.rope_scaling = {"rope_type": STANDARD_ROPE["rope_type"]}
    if getattr(config, "rope_theta", None) is None:
        repaired.rope_theta = STANDARD_ROPE["rope_theta"]
    return repaired


def _build(rotary: RotaryClass, config, device, problems: list[str], label: str) -> torch.nn.Module | None:
    """``rotary.cls`` built from ``config``, or None (with a line in
    ``problems``) when the constructor fails."""
    try:
        return rotary.cls(**constructor_arguments(rotary.cls, config, device))
    except Exception as exc:  # noqa: BLE001 - this config does not fit; the next may
        problems.append(f"{label}: {type(exc).__name__}: {exc}")
        logger.debug("%s from %s failed: %s", rotary.name, label, exc)
        return None


def with_matching_mrope_section(instance: torch.nn.Module):
    """A copy of ``instance.config`` whose ``mrope_section`` sums to the
    rotary's frequency count (``inv_freq.numel()``), rescaled
    proportionally (equal thirds when missing); None when the config has no
    ``rope_parameters`` with a rope type, the rotary no ``inv_freq``, or the
    section already fits.

    Repairs transformers 5.x default configs whose M-RoPE rotary cannot run
    (GLM-4V text, GLM-4V-MoE text, GLM-Image text: a section that does not
    sum to the rotary's frequency count; HunYuan-VL: no section at all).

    Returns:
        ``(config, section)`` or None.
    """
    config = getattr(instance, "config", None)
    parameters = getattr(config, "rope_parameters", None)
    inv_freq = getattr(instance, "inv_freq", None)
    if not isinstance(parameters, dict) or "rope_type" not in parameters or not isinstance(inv_freq, torch.Tensor):
        return None
    count = inv_freq.numel()
    section = parameters.get("mrope_section")
    if section is not None and sum(section) == count:
        return None
    weights = list(section or [1, 1, 1])
    parts = [count * weight // sum(weights) for weight in weights[:-1]]
    section = [*parts, count - sum(parts)]
    repaired = copy.deepcopy(typing.cast(typing.Any, config))  # not None: its rope_parameters is a dict
    repaired.rope_parameters = dict(parameters, mrope_section=section)
    return repaired, section


#: The original maximum position of the rope types built by with_rope_type.
ORIGINAL_MAX = 64


def with_rope_type(config, rope_type: str, dim: int):
    """A copy of ``config`` whose RoPE parameters are ``rope_type``
    (``"dynamic"`` or ``"longrope"``), switching at ORIGINAL_MAX positions
    (``max_position_embeddings`` 4x that), for every layer type; None when
    the config has no RoPE parameters to set.

    Args:
        dim: the rotary's frequency count (``inv_freq.numel()``), for
            longrope's factor lists.
    """
    theta = _rope_theta(config) or STANDARD_ROPE["rope_theta"]
    if rope_type == "dynamic":
        parameters = {"rope_type": "dynamic", "factor": 2.0}
    else:
        parameters = {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.01 * i for i in range(dim)],
            "long_factor": [2.0 + 0.1 * i for i in range(dim)],
            "original_max_position_embeddings": ORIGINAL_MAX,
        }
    repaired = copy.deepcopy(config)
    repaired.max_position_embeddings = 4 * ORIGINAL_MAX
    current = getattr(config, "rope_parameters", None)
    if isinstance(current, dict) and current:  # 5.x, maybe per layer type; other keys (mrope_section) kept
        if all(isinstance(value, dict) for value in current.values()):
            repaired.rope_parameters = {
                layer: {"rope_theta": theta, **value, **parameters} for layer, value in current.items()
            }
        else:
            repaired.rope_parameters = {"rope_theta": theta, **current, **parameters}
    elif hasattr(config, "rope_scaling") and not isinstance(current, dict):  # 4.57
        repaired.rope_scaling = {k: v for k, v in parameters.items() if k != "original_max_position_embeddings"}
        if rope_type == "longrope":
            repaired.original_max_position_embeddings = ORIGINAL_MAX
    else:
        return None
    return repaired


@dataclasses.dataclass
class Instance:
    """A rotary module built for exercising its class.

    Attributes:
        module: the module, in eval mode, on the device asked for.
        layer_types: the layer types to call it with (``[None]`` when the
            forward takes none).
        repair: "" or what was repaired in its default config to build a
            module whose forward runs.
    """

    module: torch.nn.Module
    layer_types: list
    repair: str = ""


def default_instance(rotary: RotaryClass, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build ``rotary.cls`` from its model's default config (see
    :func:`build_instance`, which also repairs an M-RoPE section).

    Args:
        rotary: the rotary class (from a scan or discovery.describe).
        device: where the module is built and left.

    Returns:
        The module, in eval mode, on ``device``.

    Raises:
        InstantiationError: no candidate config built it; the message lists
            each config tried and its error.
    """
    problems: list[str] = []
    tried = []
    for config in candidate_configs(rotary, problems):
        tried.append(config)
        module = _build(rotary, config, device, problems, type(config).__name__)
        if module is not None:
            logger.debug("%s built from %s", rotary.name, type(config).__name__)
            return module.to(device).eval()
    for config in tried:
        repaired = with_standard_rope(config, rotary.takes_layer_type)
        if repaired is None:
            continue
        label = f"{type(config).__name__} with standard RoPE parameters"
        module = _build(rotary, repaired, device, problems, label)
        if module is not None:
            logger.debug("%s built from %s", rotary.name, label)
            return module.to(device).eval()
    if not problems:
        problems.append(f"no config class found for model type {rotary.model_type!r}")
    raise InstantiationError(f"{rotary.name}: " + "; ".join(problems))


def build_instance(rotary: RotaryClass, device: str | torch.device = "cpu") -> Instance:
    """:func:`default_instance`, with its layer types; when its forward
    raises for 2-D and 3-D positions alike, rebuilt from a config with a
    matching ``mrope_section`` if that is what is wrong.

    Raises:
        InstantiationError: as default_instance.
    """
    module = default_instance(rotary, device)
    layer_types = layer_types_of(module)
    if rotary.convention != PREFIX and all(forward_raises(rotary, module, layer_type) for layer_type in layer_types):
        repaired = with_matching_mrope_section(module)
        if repaired is not None:
            config, section = repaired
            try:
                module = rotary.cls(**constructor_arguments(rotary.cls, config, device)).to(device).eval()
            except Exception as error:  # noqa: BLE001 - not repairable this way; keep the default instance
                logger.debug("%s: repaired mrope_section did not build: %s", rotary.name, error)
            else:
                return Instance(
                    module, layer_types_of(module), f"built from a repaired config (mrope_section {section})"
                )
    return Instance(module, layer_types)


def instance_from_config(rotary: RotaryClass, config, device: str | torch.device = "cpu") -> Instance:
    """Build ``rotary.cls`` from a given config (a user's model config): the
    config or the member of its family (sub-configs, text config) that fits
    the rotary best (see :func:`rank_family`), no repairs.

    Raises:
        InstantiationError: no member of the config's family builds it.
    """
    problems: list[str] = []
    family, text_ids = config_family(config)
    for member in rank_family(rotary, family, text_ids, wanted_config_classes(rotary.cls)):
        module = _build(rotary, member, device, problems, type(member).__name__)
        if module is not None:
            module = module.to(device).eval()
            return Instance(module, layer_types_of(module))
    raise InstantiationError(f"{rotary.name}: " + ("; ".join(problems) or "no config in the family fits"))


# --------------------------------------------------------------------------
# Layer types and the probe


def layer_types_of(instance: torch.nn.Module) -> list[str | None]:
    """The layer types to call ``instance``'s forward with.

    Args:
        instance: a built rotary module.

    Returns:
        For a forward that takes ``layer_type``: the keys of
        ``instance.rope_type`` when it is a dict (the types that have
        parameters), else ``instance.layer_types``, else
        ``instance.config.layer_types``, de-duplicated and sorted;
        ``[None]`` for other forwards or when none is known.
    """
    if not describe(type(instance)).takes_layer_type:
        return [None]
    rope_type = getattr(instance, "rope_type", None)
    if isinstance(rope_type, dict) and rope_type:
        return sorted(rope_type, key=str)
    types = getattr(instance, "layer_types", None)
    if not types:
        types = getattr(getattr(instance, "config", None), "layer_types", None)
    return sorted(set(types), key=str) if types else [None]


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's buffers or parameters live (cpu when it has none)."""
    for tensor in (*module.buffers(), *module.parameters()):
        return tensor.device
    return torch.device("cpu")


def unpatched_forward(rotary: RotaryClass, instance: torch.nn.Module, position_ids, layer_type=None):
    """The class's own (unpatched) forward on a probe activation of
    PROBE_SHAPE's batch and ``position_ids``' sequence length."""
    forward = rotary.forward or rotary.cls.forward
    forward = original_of(forward) or forward  # never probe our own replacement
    device = _device_of(instance)
    x = torch.randn(position_ids.shape[-2], position_ids.shape[-1], PROBE_SHAPE[-1], device=device)
    args = (x, position_ids.to(device), layer_type) if rotary.takes_layer_type else (x, position_ids.to(device))
    with torch.no_grad():
        return forward(instance, *args)


def forward_raises(rotary: RotaryClass, instance: torch.nn.Module, layer_type=None) -> bool:
    """The unpatched forward raises for 2-D probe positions and for the same
    positions on MROPE_AXES axes alike."""
    positions = torch.arange(PROBE_POSITIONS)[None]
    for candidate in (positions, positions[None].expand(MROPE_AXES, -1, -1)):
        try:
            unpatched_forward(rotary, instance, candidate, layer_type)
            return False
        except Exception:  # noqa: BLE001 - the question is only whether it raises
            continue
    return True
