"""The replacement forward: a plain function, so that torch.compile traces it
(a wrapt FunctionWrapper as ``forward`` breaks ``fullgraph=True`` with a guard
error); ``functools.wraps`` keeps the original on ``__wrapped__``.

The fast path finds the module's table for the call's (device, dtype,
layer_type) and asks :func:`rope_patch.cache.rule.answering_form` whether it
may answer; everything else goes to :func:`rope_patch.cache.call`.
"""

from __future__ import annotations

import functools

import torch

from rope_patch.cache import call as slow_call
from rope_patch.cache import rule, states

_Tensor = torch.Tensor
_steps_aside = rule.steps_aside
_answering_form = rule.answering_form
_MISSING = object()

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

    retired = []  # non-empty once unpatch() left us beneath another wrapper

    @functools.wraps(original)
    def forward(self, x, position_ids, *args, **kwargs):
        # Be the original exactly while a tracer or transform runs (rule.py),
        # for inputs that are not plain tensors, for a subclass whose own
        # forward calls us through super(), and once retired.
        if (
            _steps_aside()
            or retired
            or type(position_ids) is not _Tensor
            or type(x) is not _Tensor
            or (type(self).forward is not forward and not _wraps(type(self).forward, forward))
        ):
            return original(self, x, position_ids, *args, **kwargs)
        if takes_layer_type and len(args) + len(kwargs) == 1:
            layer_type = args[0] if args else kwargs.get("layer_type", _MISSING)
            if layer_type is _MISSING:  # an unknown keyword: let the original complain
                return original(self, x, position_ids, *args, **kwargs)
            extra = (layer_type,)
        elif args or kwargs:
            return original(self, x, position_ids, *args, **kwargs)
        else:
            layer_type = None
            extra = ()
        state = states.get(id(self))
        if state is not None:
            table = state.tables.get((x.device, x.dtype, layer_type))
            if table is not None:
                form = _answering_form(table, x, position_ids)
                if form is not None:
                    try:
                        return form.lookup(self, x, position_ids)
                    except (IndexError, RuntimeError):
                        pass  # outside the table on CPU: the slow path grows it
            elif state.fallback is not None:  # this module is never cached
                return original(self, x, position_ids, *extra)
        return slow_call(self, original, x, position_ids, layer_type, extra)

    setattr(forward, MARKER, original)
    forward.__rope_patch_retired__ = retired
    return forward


def retire(function) -> None:
    """Make a rope_patch forward run its original from now on (unpatch()
    could not remove it from beneath another wrapper)."""
    function.__rope_patch_retired__.append(True)


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
