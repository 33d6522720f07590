"""Repaired and varied configs: a default config its own model cannot run
(empty RoPE parameters, an ``mrope_section`` that does not fit), and the
changing rope types (dynamic, longrope) set on a config for the verifier.

Public: :data:`STANDARD_ROPE`, :func:`with_standard_rope`,
:func:`with_matching_mrope_section`, :data:`ORIGINAL_MAX`,
:func:`with_rope_type`.
"""

from __future__ import annotations

import copy
import typing

import torch

from rope_patch.diagnostics.configs import rope_theta

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
    theta = rope_theta(config) or STANDARD_ROPE["rope_theta"]
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
