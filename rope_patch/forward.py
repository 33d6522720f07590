"""The replacement forward: a plain function, so that torch.compile traces it
(a wrapt FunctionWrapper as ``forward`` breaks ``fullgraph=True`` with a guard
error); ``functools.wraps`` keeps the original on ``__wrapped__``.

The fast path is a handful of attribute checks and one gather per output;
everything else goes to :func:`rope_patch.tables.slow_call`.
"""

from __future__ import annotations

import functools
import threading

import torch

from rope_patch import tables

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_states = tables._states  # the dict itself: one lookup per call, no attribute hop
_embedding = torch.embedding
_INDEX_DTYPES = tables.INDEX_DTYPES


class _Local(threading.local):
    """Per-thread switch set by :func:`rope_patch.disabled`."""

    disabled = 0


local = _Local()

#: Marks functions installed by rope_patch (and finds their original).
MARKER = "__rope_patch_original__"


def make_forward(original, takes_layer_type: bool):
    """A forward that answers from tables and otherwise calls ``original``.

    Args:
        original: the class's own forward function.
        takes_layer_type: the forward's third parameter is ``layer_type``.

    Returns:
        The replacement function, with ``__wrapped__`` and MARKER set to
        ``original``.
    """

    @functools.wraps(original)
    def forward(self, x, position_ids, *args, **kwargs):
        # While dynamo traces, or a subclass overrides forward and calls us
        # through super(), or the user disabled us: be the original exactly.
        if (
            _is_compiling()
            or local.disabled
            or type(self).forward is not forward
            or type(position_ids) is not _Tensor
            or type(x) is not _Tensor
        ):
            return original(self, x, position_ids, *args, **kwargs)
        if takes_layer_type and len(args) + len(kwargs) == 1:
            layer_type = args[0] if args else kwargs.get("layer_type", forward)
            if layer_type is forward:  # an unknown keyword: let the original complain
                return original(self, x, position_ids, *args, **kwargs)
            extra = (layer_type,)
        elif args or kwargs:
            return original(self, x, position_ids, *args, **kwargs)
        else:
            layer_type = None
            extra = ()
        state = _states.get(id(self))
        if state is not None:
            table = state.tables.get((x.device, x.dtype, layer_type))
            if table is not None:
                pair = table.pair
                try:
                    if pair is None:
                        out = table.answer(self, x, position_ids)
                        if out is not None:
                            return out
                    elif (
                        position_ids.dim() == 2
                        and position_ids.dtype in _INDEX_DTYPES
                        and table.is_current(self)
                    ):
                        # The common case (CPU, a (cos, sin) pair): two gathers.
                        # An out-of-range position raises IndexError here.
                        return _embedding(pair[0], position_ids), _embedding(pair[1], position_ids)
                except (IndexError, RuntimeError):
                    pass
        return tables.slow_call(self, original, x, position_ids, layer_type, extra)

    setattr(forward, MARKER, original)
    return forward


def original_of(function):
    """The original forward behind a rope_patch forward, or None."""
    return getattr(function, MARKER, None)
