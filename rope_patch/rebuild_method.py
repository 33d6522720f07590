"""The replacement of a rotary's cache rebuild (``_set_cos_sin_cache``, the
convention of rope_patch.cache.rebuild): a rebuild called by the module's
own forward is answered from a verified table; any other call, and any
call the table cannot answer, goes to the engine's slow path
(:func:`rope_patch.cache.rebuild.answer`) or to the original.

This is the rebuild's counterpart of rope_patch.forward: a plain function
installed on the class by rope_patch.patching, marked (rope_patch.marks)
with its original. Which rebuilds it answers is decided here, by the
caller-frame test, so that the forward itself stays the class's own.

Public: :func:`make_method`.
"""

from __future__ import annotations

import functools
import sys

import torch

from rope_patch.cache import rule
from rope_patch.cache import states as module_states
from rope_patch.cache.rebuild import METHOD, PARAMETERS, REBUILD
from rope_patch.cache.rebuild import answer as slow_rebuild
from rope_patch.marks import is_wrapper_of, mark

_MISSING = object()
_steps_aside = rule.steps_aside
_getframe = sys._getframe
_capturing = rule.capturing


def _called_by_forward(frame, module) -> bool:
    """``frame`` (the rebuild's caller) is a forward of ``module`` (a
    function named ``forward`` whose first argument is ``module``): only
    rebuilds the forward calls are answered, never those of ``__init__``
    or of other code. Read from the caller's frame, on rebuild calls only,
    so that the forward itself stays the class's own: a call within the
    module's cache costs exactly what it costs unpatched."""
    code = frame.f_code
    if code.co_name != "forward" or code.co_argcount < 1:
        return False
    return frame.f_locals.get(code.co_varnames[0]) is module


def make_method(original):
    """The replacement of the class's METHOD: a rebuild called by the
    module's own forward is answered from a table; any other call runs
    ``original``."""
    retired: list[bool] = []  # non-empty once retired (rope_patch.marks.retire)
    states = module_states  # a closure variable, read on every rebuild
    hooks = getattr(torch.nn.modules.module, "_global_buffer_registration_hooks", {})

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if (
            _steps_aside()  # first: under dynamo nothing below is traced
            or not _called_by_forward(_getframe(1), self)
            or retired
            or hooks  # register_buffer would run them; a replay would not
            or (getattr(type(self), METHOD) is not method and not is_wrapper_of(getattr(type(self), METHOD), method))
        ):
            return original(self, *args, **kwargs)
        seq_len, device, dtype = _arguments(args, kwargs)
        if type(seq_len) is not int or type(device) is not torch.device or type(dtype) is not torch.dtype:
            return original(self, *args, **kwargs)
        state = states.get(id(self))
        if state is not None and state.fallback is None:
            table = state.tables.get((device, dtype, None))
            if table is not None:
                form = table.forms.get(REBUILD)
                if (
                    form is not None
                    and form.verified
                    and 0 < seq_len <= table.size
                    and (table.on_cpu or not _capturing(device))
                    and table.watch.holds()
                ):
                    form.program.replay(self, table.columns, seq_len)
                    return None
        return slow_rebuild(self, original, seq_len, device, dtype, args, kwargs)

    return mark(method, original, retired)


def _arguments(args: tuple, kwargs: dict):
    """``(seq_len, device, dtype)`` as the call passed them (_MISSING where not)."""
    if not args and len(kwargs) == 3:  # the convention's own call: all by name
        return kwargs.get("seq_len", _MISSING), kwargs.get("device", _MISSING), kwargs.get("dtype", _MISSING)
    if not kwargs and len(args) == 3:
        return args
    values = dict(zip(PARAMETERS, args, strict=False))
    for name, value in kwargs.items():
        if name not in PARAMETERS or name in values:
            return _MISSING, _MISSING, _MISSING
        values[name] = value
    return tuple(values.get(name, _MISSING) for name in PARAMETERS)


__all__ = ["make_method"]
