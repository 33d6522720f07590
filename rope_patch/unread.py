"""Proving, from its bytecode, that a forward never reads one of its
parameters (``seq_len``), so that calls passing it can be answered as calls
that do not.

Phi-3's remote code (v0.0.5) passes ``seq_len=kv_seq_len`` on every call to
``forward(x, position_ids, seq_len=None)`` rotaries that ignore it
(``Phi3RotaryEmbedding``) or overwrite it first thing
(``seq_len = torch.max(position_ids) + 1``). A forward that reads it in any
way (transformers 4.38's ``if seq_len is not None: warn``) is not proven,
and such calls keep going to the original.

The proof is deliberately narrow: the parameter is a plain local (no
closure captures it), and either no instruction references it, or the
first one is a store reached by straight-line code from the entry (no jump,
no jump target, no exception handler covering it, no call of ``locals``,
``vars``, ``eval``, ``exec`` or frame inspection before it). Decorators
are seen through only when they are torch's grad-mode context decorators
(``torch.no_grad()``, ...), which pass every argument through untouched.
"""

from __future__ import annotations

import dis
import functools

#: Instructions that read a local variable (3.10 - 3.13 spellings).
_READS = frozenset(
    {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_FAST_LOAD_FAST", "DELETE_FAST", "LOAD_FAST_BORROW"}
)
#: Instructions that write a local variable.
_STORES = frozenset({"STORE_FAST", "STORE_FAST_STORE_FAST", "STORE_FAST_LOAD_FAST"})
#: 3.10's instructions that install an exception handler.
_SETUPS = frozenset({"SETUP_FINALLY", "SETUP_WITH", "SETUP_ASYNC_WITH"})
#: Names whose call could read the frame's locals.
_FRAME_READERS = frozenset({"locals", "vars", "eval", "exec", "sys", "inspect", "_getframe", "currentframe"})
_JUMPS = frozenset(dis.hasjrel) | frozenset(dis.hasjabs) | frozenset(getattr(dis, "hasjump", ()))
#: Rope_patch's replacement forwards keep the class's own forward here.
_ORIGINAL = "__rope_patch_original__"


def never_read(function, parameter: str) -> bool:
    """Whether ``function`` provably never reads the value passed for
    ``parameter`` (see the module docstring). False whenever unsure."""
    function = getattr(function, _ORIGINAL, None) or function
    function = _through_grad_decorators(function)
    code = getattr(function, "__code__", None)
    if code is None or parameter not in code.co_varnames[: code.co_argcount]:
        return False
    if parameter in code.co_cellvars or parameter in code.co_freevars:
        return False  # an inner function reads it
    try:
        instructions = list(dis.get_instructions(code))
        handlers = _handler_starts(code)
    except Exception:  # noqa: BLE001 - unreadable bytecode proves nothing
        return False
    references = [i for i in instructions if _names(i) and parameter in _names(i)]
    if not references:
        return True
    first = references[0]
    if first.opname not in _STORES or (first.opname == "STORE_FAST_LOAD_FAST" and _names(first)[-1] == parameter):
        return False
    if handlers is None or any(start <= first.offset for start in handlers):
        return False
    for instruction in instructions:
        if instruction.offset >= first.offset:
            return True
        if (
            instruction.opcode in _JUMPS
            or getattr(instruction, "is_jump_target", False)
            or instruction.opname in _SETUPS
            or (instruction.opname.startswith("LOAD_") and instruction.argval in _FRAME_READERS)
            or (instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and instruction.argval in _FRAME_READERS)
        ):
            return False
    return False


def _names(instruction) -> tuple:
    """The local names a fast-local instruction touches (3.13 combines two)."""
    if instruction.opname not in _READS and instruction.opname not in _STORES:
        return ()
    value = instruction.argval
    return tuple(value) if isinstance(value, tuple) else (value,)


def _handler_starts(code) -> list[int] | None:
    """Start offsets of the code ranges an exception handler covers (3.11+);
    [] before 3.11 (handlers are SETUP_* instructions, seen in the stream);
    None when they cannot be read."""
    if not hasattr(code, "co_exceptiontable"):
        return []
    try:
        # typeshed does not declare Bytecode.exception_entries (3.11+, undocumented)
        return [entry.start for entry in dis.Bytecode(code).exception_entries]  # type: ignore[attr-defined]
    except AttributeError:
        return None


@functools.lru_cache(maxsize=1)
def _grad_decorator_codes() -> frozenset:
    """Code objects of the wrappers torch's grad-mode context decorators
    make: they call the function with every argument untouched."""
    import torch

    codes = set()
    for context in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        try:
            codes.add(context()(lambda: None).__code__)
        except Exception:  # noqa: BLE001 - a torch without it: one fewer wrapper seen through
            continue
    return frozenset(codes)


def _through_grad_decorators(function, depth: int = 8):
    """The function beneath torch grad-mode decorators; a wrapper of any
    other kind is returned as it is (its code then decides)."""
    for _ in range(depth):
        inner = getattr(function, "__wrapped__", None)
        if inner is None or getattr(function, "__code__", None) not in _grad_decorator_codes():
            return function
        function = inner
    return function
