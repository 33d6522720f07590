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
# Dynamo replaces is_dynamo_compiling() by True while tracing; otherwise it is
# a bare ``return False`` (is_compiling() also asks jit.is_scripting()). Fake
# and functional tensors (export, make_fx) fail the exact-type checks below
# and reach the original anyway.
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_states = tables._states  # the dict itself: one lookup per call, no attribute hop
_embedding = torch.embedding
_MISSING = object()


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
            or (type(self).forward is not forward and not _wraps(type(self).forward, forward))
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
            key = (x.device, x.dtype, layer_type)
            table = state.tables.get(key, _MISSING)
            if table is _MISSING:
                if state.fallback is not None:  # this module is never cached
                    return original(self, x, position_ids, *extra)
            elif table is None:  # position-dependent rope type: always unpatched
                return original(self, x, position_ids, *extra)
            else:
                pair = table.pair
                try:
                    if pair is None:
                        out = table.answer(self, x, position_ids)
                        if out is not None:
                            return out
                    elif position_ids.dim() == 2 and position_ids.numel() and table.is_current(self):
                        # The common case (CPU, a (cos, sin) pair): two gathers.
                        # Out-of-range positions raise IndexError here, and
                        # non-index dtypes RuntimeError: both take the slow path.
                        return _embedding(pair[0], position_ids), _embedding(pair[1], position_ids)
                except (IndexError, RuntimeError):
                    pass
        return tables.slow_call(self, original, x, position_ids, layer_type, extra)

    setattr(forward, MARKER, original)
    return forward


def _wraps(outer, target, depth: int = 8) -> bool:
    """``outer`` is ``target`` behind other wrappers (its ``__wrapped__``
    chain): a foreign decorator applied after rope_patch keeps the tables.

    Checked only when ``type(self).forward`` is not this wrapper, which is
    otherwise a super() call from a subclass's own wrapped forward: that one
    must run the original, or two wrappers would share one table key.
    """
    for _ in range(depth):
        outer = getattr(outer, "__wrapped__", None)
        if outer is None:
            return False
        if outer is target:
            return True
    return False


def original_of(function):
    """The original forward behind a rope_patch forward, or None."""
    return getattr(function, MARKER, None)
