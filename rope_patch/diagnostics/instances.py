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

Where each step lives: finding and ranking configs in
rope_patch.diagnostics.configs, the repairs (and the rope-type variants the
verifier builds) in rope_patch.diagnostics.repairs; this module fills the
constructor, builds, and probes the forward.

Public: :class:`Instance`, :class:`InstantiationError`,
:func:`build_instance`, :func:`default_instance`,
:func:`instance_from_config`, :func:`constructor_arguments`,
:func:`layer_types_of`, :func:`unpatched_forward`, :func:`forward_raises`,
and the probe's shapes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys

import torch

from rope_patch.diagnostics.configs import (
    candidate_configs,
    config_family,
    head_dim,
    init_parameters,
    is_config_parameter,
    rank_family,
    rope_theta,
    wanted_config_classes,
)
from rope_patch.diagnostics.repairs import with_matching_mrope_section, with_standard_rope
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
    for param in init_parameters(cls):
        if is_config_parameter(param, namespace):
            value = config
        elif param.name == "device":
            value = device
        elif param.name in _DIM_NAMES:
            value = head_dim(config)
        elif param.name in _THETA_NAMES:
            value = rope_theta(config)
        else:
            value = getattr(config, param.name, None)
        if value is not None:
            kwargs[param.name] = value
        elif param.default is inspect.Parameter.empty:
            raise _NoValue(f"no value for required parameter {param.name!r}")
    return kwargs


def _build(rotary: RotaryClass, config, device, problems: list[str], label: str) -> torch.nn.Module | None:
    """``rotary.cls`` built from ``config``, or None (with a line in
    ``problems``) when the constructor fails."""
    try:
        return rotary.cls(**constructor_arguments(rotary.cls, config, device))
    except Exception as exc:  # noqa: BLE001 - this config does not fit; the next may
        problems.append(f"{label}: {type(exc).__name__}: {exc}")
        logger.debug("%s from %s failed: %s", rotary.name, label, exc)
        return None


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
