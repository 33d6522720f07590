"""The convention a cache-rebuilding rotary follows (see rope_patch.cache.rebuild):
the method's name and parameters, how a class is recognised as following it,
and how a class's rebuilds are reported once answered.

Public: :data:`METHOD`, :data:`PARAMETERS`, :data:`REBUILD`,
:data:`OWN_CACHE`, :data:`MIN_LEARN`, :func:`rebuild_method`,
:func:`answers_rebuilds`.
"""

from __future__ import annotations

import inspect

from rope_patch.marks import is_retired, original_of

#: The method, and its parameters after ``self``, that the convention names.
METHOD = "_set_cos_sin_cache"
PARAMETERS = ("seq_len", "device", "dtype")
#: The key of a rebuild table's form in ``Table.forms`` (and its name in cache_info).
REBUILD = "rebuild"
#: What happens to the calls a forward answers within its own cache
#: (every module of a class whose rebuild is answered lists it).
OWN_CACHE = (
    f"calls within its own cache are answered by its forward (nothing to gain); tables answer its cache "
    f"rebuilds ({METHOD})"
)
#: The smallest table a delta is learnt from (its half must differ from 1).
MIN_LEARN = 4


def rebuild_method(cls: type) -> str | None:
    """METHOD when ``cls`` (whose forward takes ``(x, seq_len)``) has it,
    taking exactly PARAMETERS; else None."""
    method = getattr(cls, METHOD, None)
    if method is None:
        return None
    try:
        names = tuple(inspect.signature(method).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return METHOD if names == PARAMETERS else None


def answers_rebuilds(cls: type) -> bool:
    """rope_patch answers the cache rebuilds of ``cls`` (its METHOD is
    rope_patch's, not retired): its modules' calls within their own cache
    are OWN_CACHE."""
    method = getattr(cls, METHOD, None)
    return original_of(method) is not None and not is_retired(method)
