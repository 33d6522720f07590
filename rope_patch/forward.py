"""The replacement forward: a plain function, so that torch.compile traces it
(a wrapt FunctionWrapper as ``forward`` breaks ``fullgraph=True`` with a guard
error); ``functools.wraps`` keeps the original on ``__wrapped__``.

The fast path finds the module's table for the call's (device, dtype,
key argument) and asks :func:`rope_patch.cache.rule.answering_form` whether
it may answer; everything else goes to :func:`rope_patch.cache.call`. One
factory per calling convention (rope_patch.discovery): ``forward(x,
position_ids[, layer_type | seq_len=None])`` and ``forward(x, seq_len)``.

Public: :func:`make_forward`; and, from rope_patch.marks, :data:`MARKER`,
:func:`original_of` and :func:`retire` (what patching and the tools read
from an installed forward).
"""

from __future__ import annotations

import functools

import torch

from rope_patch import discovery
from rope_patch.cache import call as slow_call
from rope_patch.cache import hand_over, rule, states
from rope_patch.cache.fast import answer_for
from rope_patch.cache.state import SEQ_LEN_READ
from rope_patch.marks import MARKER, mark, original_of, retire
from rope_patch.marks import is_wrapper_of as _wraps

_Tensor = torch.Tensor
_steps_aside = rule.steps_aside
_answering_form = rule.answering_form
_states_get = states.get
# rule.steps_aside, unrolled into the hot path (one frame less per call).
_is_compiling = rule.is_compiling
_local = rule.local
_disabling = rule.disabling
_is_tracing = rule.is_tracing
_functorch_level = rule.functorch_level
_dispatch_modes = rule.dispatch_modes
_MISSING = object()


def make_forward(original, rotary: discovery.RotaryClass):
    """A forward that answers from tables and otherwise calls ``original``.

    Args:
        original: the class's own forward function.
        rotary: the class as discovery describes it (its calling convention).

    Returns:
        The replacement function, with ``__wrapped__`` and MARKER set to
        ``original``.
    """
    if rotary.convention == discovery.PREFIX:
        return _prefix_forward(original)
    return _positions_forward(original, rotary.extra, rotary.unread_seq_len)


def _positions_forward(original, extra_parameter, unread_seq_len=False):
    retired: list[bool] = []  # non-empty once unpatch() left us beneath another wrapper
    keyed = extra_parameter == "layer_type"

    @functools.wraps(original)
    def forward(self, x, position_ids, *args, **kwargs):
        # The hot path, in this one frame: the context (rule.steps_aside, the
        # same checks inline), plain tensors, no subclass calling us through
        # super(), then the compiled answer of the table that answered this
        # module last (rope_patch.cache.fast), which checks the rest of the
        # rule. Anything else, or a refusal, takes the general path. (Once
        # retired, by unpatch(), no module has a compiled answer and none is
        # made: the general path checks ``retired`` before anything.)
        if not (
            _is_compiling()
            or (_disabling[0] and _local.disabled)
            or _is_tracing()
            or _functorch_level() is not None
            or _dispatch_modes()
            or kwargs
            or type(x) is not _Tensor
            or type(position_ids) is not _Tensor
            or type(self).forward is not forward
        ):
            state = _states_get(id(self))
            if state is not None:
                if not args or (unread_seq_len and len(args) == 1):
                    answer = state.answer
                elif keyed and len(args) == 1:
                    answer = state.answers.get(args[0])
                else:
                    answer = None
                if answer is not None:
                    out = answer(self, x, position_ids)
                    if out is not None:
                        return out
        return general(self, x, position_ids, args, kwargs)

    def general(self, x, position_ids, args, kwargs):
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
        if args or kwargs:
            value = args[0] if args else kwargs.get(extra_parameter, _MISSING)
            if extra_parameter is None or len(args) + len(kwargs) != 1 or value is _MISSING:
                return original(self, x, position_ids, *args, **kwargs)  # let the original judge them
            if not keyed and value is not None and not unread_seq_len:  # seq_len the forward may read
                hand_over(self, SEQ_LEN_READ)
                return original(self, x, position_ids, *args, **kwargs)
            layer_type = value if keyed else None
            extra: tuple[object, ...] = (value,)
        else:
            layer_type = None
            extra = ()
        state = states.get(id(self))
        if state is not None:
            if state.fallback is not None:  # this module is never cached
                return original(self, x, position_ids, *extra)
            table = state.tables.get((x.device, x.dtype, layer_type))
            if table is not None:
                form = _answering_form(table, x, position_ids)
                if form is not None:
                    try:
                        out = form.lookup(self, x, position_ids)
                    except (IndexError, RuntimeError):
                        pass  # outside the table on CPU: the slow path grows it
                    else:
                        _remember(state, table, form, x.dtype, layer_type)
                        return out
                elif table.forms.get(position_ids.dim(), _MISSING) is None:  # a layout it never answers
                    return original(self, x, position_ids, *extra)
        return slow_call(self, original, x, position_ids, layer_type, extra)

    return mark(forward, original, retired)


def _remember(state, table, form, dtype, layer_type) -> None:
    """Make ``table``'s compiled answer of ``form`` the one the hot path
    tries first for this module's calls of ``layer_type``."""
    if form.dims == 0:
        return
    answer = answer_for(table, form, dtype)
    if layer_type is None:
        state.answer = answer
    else:
        state.answers[layer_type] = answer


def _prefix_forward(original):
    retired: list[bool] = []

    @functools.wraps(original)
    def forward(self, x, *args, **kwargs):
        seq_len = args[0] if len(args) == 1 and not kwargs else kwargs.get("seq_len") if len(kwargs) == 1 else None
        if (
            _steps_aside()
            or retired
            or type(seq_len) is not int
            or type(x) is not _Tensor
            or (type(self).forward is not forward and not _wraps(type(self).forward, forward))
        ):
            return original(self, x, *args, **kwargs)
        state = states.get(id(self))
        if state is not None:
            if state.fallback is not None:
                return original(self, x, seq_len)
            table = state.tables.get((x.device, x.dtype, None))
            if table is not None:
                form = _answering_form(table, x, seq_len)
                if form is not None:
                    return form.lookup(self, x, seq_len)
        return slow_call(self, original, x, seq_len, None, ())

    return mark(forward, original, retired)


__all__ = ["MARKER", "make_forward", "original_of", "retire"]
