"""Rope types whose frequencies change between calls, and how tables follow
them.

transformers decorates rotary forwards with ``dynamic_rope_update``, which,
before the forward proper, updates the module's frequency state from the
largest position of the call (read each line's modeling_rope_utils):

- ``dynamic`` (NTK) types grow ``inv_freq`` (and ``attention_scaling``,
  ``max_seq_len_cached``) when a call goes past ``max_seq_len_cached``, and
  reset them to the original ones when a call is back below
  ``original_max_seq_len``;
- ``longrope`` picks the long or the short frequency set by whether
  ``max(position_ids) + 1`` exceeds the original maximum (5.x copies the set
  into ``inv_freq`` in place and sets ``long_inv_freq``; 4.57 re-registers
  ``inv_freq`` as one of two tensors).

Tables follow them without knowing their arithmetic: on the slow path the
engine runs transformers' own update (the decorator applied to a no-op
forward, so the module's state after a patched call is exactly what an
unpatched call leaves), then answers from the table of the state the module
is now in. Tables are built from, and unpatched results computed by, the
class's forward itself: its own update then runs a second time and changes
nothing (the state already is what the call's positions select). What a
:class:`Family` knows is only where a table of one state may answer
*without* the update running, because the update would change nothing:

- dynamic: while the module is unscaled, positions below
  ``original_max_seq_len`` (tables stop there); scaled states are computed
  unpatched;
- longrope: the short set, positions below the original maximum (tables
  stop there); the long set, calls whose largest position is at or past
  the original maximum (``Table.top_from``: the call's largest position is
  read, as on accelerators for the bound check), or any call after the
  update ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def _noop_forward(self, x, position_ids, *args, **kwargs):
    return None


class Family:
    """A rope type computed through ``dynamic_rope_update``.

    Attributes:
        name: ``"dynamic"`` or ``"longrope"``.
        update: transformers' update alone: ``update(module, x, position_ids, *extra)``.
    """

    def __init__(self, name: str, update):
        self.name = name
        self.update = update

    def limit(self, module, layer_type, high: int, cap: int) -> int:
        """The largest table size for a call whose largest position is
        ``high``, after its update ran."""
        if self.name == "dynamic":
            return min(cap, module.original_max_seq_len)
        threshold = longrope_threshold(module, layer_type)
        return min(cap, threshold) if high + 1 <= threshold else cap

    def cacheable(self, module, layer_type) -> bool:
        """The state the module is in now may get a table (dynamic: not
        while scaled, where every growth is a new state)."""
        if self.name != "dynamic":
            return True
        cached = getattr(module, "max_seq_len_cached", None)
        if layer_type is not None:
            cached = getattr(module, f"{layer_type}_max_seq_len_cached", cached)
        original = getattr(module, "original_max_seq_len", None)
        return type(cached) is int and cached == original

    def top_from(self, module, layer_type, size: int) -> int:
        """0, or the largest position a call must reach for a table of
        ``size`` positions in the current state to answer it without the
        update (longrope's long set: the original maximum, where the update
        would select the set the module already holds)."""
        if self.name == "longrope":
            threshold = longrope_threshold(module, layer_type)
            if size > threshold:
                return threshold
        return 0


def longrope_threshold(module, layer_type) -> int:
    """The original maximum longrope compares ``max(position_ids) + 1`` with:
    5.x reads ``config.rope_parameters[...]["original_max_position_embeddings"]``
    (per layer type when it has one); 4.57 reads
    ``config.original_max_position_embeddings``, else ``max_position_embeddings``."""
    config = module.config
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict):
        if layer_type is not None and isinstance(parameters.get(layer_type), dict):
            parameters = parameters[layer_type]
        if "original_max_position_embeddings" in parameters:
            return parameters["original_max_position_embeddings"]
    if hasattr(config, "original_max_position_embeddings"):
        return config.original_max_position_embeddings
    return config.max_position_embeddings


#: [transformers' update alone (see _update_only), or None], once made.
_UPDATE: list[Callable[..., None] | None] = []


def _update_only():
    """``dynamic_rope_update`` applied to a no-op forward: transformers' own
    state update and nothing else (None when transformers has none)."""
    if not _UPDATE:
        try:
            from transformers.modeling_rope_utils import dynamic_rope_update
        except ImportError:  # pragma: no cover - both supported lines have it
            _UPDATE.append(None)
        else:
            _UPDATE.append(dynamic_rope_update(_noop_forward))
    return _UPDATE[0]


def rope_type_of(module, layer_type):
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(layer_type)
    return rope_type if isinstance(rope_type, str) else None


def family_for(module, original, layer_type):
    """How ``module``'s frequencies change between calls of ``layer_type``.

    Returns:
        None for a static rope type; a Family for dynamic and longrope types
        whose forward is transformers' ``dynamic_rope_update`` wrapper; a
        string (why it is computed unpatched) for such types behind any
        other forward.
    """
    rope_type = rope_type_of(module, layer_type)
    if rope_type is None or ("dynamic" not in rope_type and rope_type != "longrope"):
        return None
    if not uses_dynamic_rope_update(original):
        return (
            f"{rope_type} rope type behind a forward that is not transformers' dynamic_rope_update: recomputed per call"
        )
    return Family("dynamic" if "dynamic" in rope_type else "longrope", _update_only())


def uses_dynamic_rope_update(forward) -> bool:
    """``forward`` is transformers' ``dynamic_rope_update`` wrapper, maybe
    under other decorators (``torch.no_grad()`` on 4.57)."""
    update = _update_only()
    return update is not None and _decorated_by(forward, update.__code__)


def _decorated_by(function, code, depth: int = 8) -> bool:
    """``function`` is, or wraps (``__wrapped__`` chain: ``torch.no_grad()``
    on 4.57), a function whose code is ``code``."""
    for _ in range(depth):
        if function is None:
            return False
        if getattr(function, "__code__", None) is code:
            return True
        function = getattr(function, "__wrapped__", None)
    return False
