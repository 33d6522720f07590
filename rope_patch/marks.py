"""The mark on the functions rope_patch installs on a class (the replacement
forward, the replacement cache rebuild): how to find their original, and
how to retire them.

A vocabulary, not a mechanism: the functions are made one layer up
(rope_patch.forward, rope_patch.rebuild_method) and installed by
rope_patch.patching; the table engine only reads the mark, to report
whether a class's cache rebuilds are answered (rope_patch.cache.rebuild).
It lives below all of them so that none has to import another to read it.

Public: :data:`MARKER`, :func:`mark`, :func:`original_of`, :func:`retire`,
:func:`is_retired`, :func:`is_wrapper_of`.
"""

from __future__ import annotations

#: Marks functions installed by rope_patch (and finds their original).
MARKER = "__rope_patch_original__"
#: The attribute holding a function's ``retired`` list (non-empty once retired).
RETIRED = "__rope_patch_retired__"


def mark(function, original, retired: list):
    """Mark ``function`` as rope_patch's replacement of ``original``.

    Args:
        function: the replacement.
        original: the function it replaces (its MARKER).
        retired: the list the replacement reads (non-empty once retired):
            :func:`retire` appends to it.

    Returns:
        ``function``.
    """
    setattr(function, MARKER, original)
    setattr(function, RETIRED, retired)
    return function


def retire(function) -> None:
    """Make a rope_patch function run its original from now on (unpatch()
    could not remove it from beneath another wrapper)."""
    getattr(function, RETIRED).append(True)


def is_retired(function) -> bool:
    """``function`` was retired, or is not rope_patch's."""
    return bool(getattr(function, RETIRED, True))


def is_wrapper_of(outer, target, depth: int = 8) -> bool:
    """``outer`` is ``target`` behind other wrappers (its ``__wrapped__``
    chain): a foreign decorator applied after rope_patch keeps the tables.

    The replacements check it only when the class's attribute is not
    themselves, which is otherwise a super() call from a subclass's own
    wrapped function: that one must run the original, or two wrappers
    would share one table key.
    """
    for _ in range(depth):
        outer = getattr(outer, "__wrapped__", None)
        if outer is None:
            return False
        if outer is target:
            return True
    return False


def original_of(function):
    """The original function behind a rope_patch function, or None."""
    return getattr(function, MARKER, None)


__all__ = ["MARKER", "RETIRED", "is_retired", "is_wrapper_of", "mark", "original_of", "retire"]
