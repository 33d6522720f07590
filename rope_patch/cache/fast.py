"""The rule compiled for one table: what the fast path runs on a table hit.

:func:`rope_patch.cache.rule.answering_form` reads the rule's inputs from
the table on every call: its forms, device, bound and longrope settings,
and the :class:`~rope_patch.cache.watch.Watch` of what the forward read,
through several Python frames. At decode that bookkeeping costs as much as
one of the two gathers it guards. :func:`compile_answer` writes the same
items 6-10 for one (table, form, activation dtype) as a single function
whose constants (the buffer watched, its version and storage address, the
plain values read, the columns) are closure variables: one frame, no
loops, no attribute reads on rope_patch objects.

The compiled function returns the call's output, or None wherever
:func:`~rope_patch.cache.rule.answering_form` would not answer; the caller
then takes the general path, which decides by the rule itself (and, after
a failed gather on CPU, grows the table). Two differences in *how*, none
in what is answered:

- a plain pair gather (the common ``(cos, sin)`` form) lets
  ``torch.embedding`` reject index dtypes other than int64/int32 (it raises
  for every other dtype; the caller then takes the general path, which
  refuses them) instead of testing the dtype first;
- a missing watched entry raises KeyError inside the function, which counts
  as "changed", as the rule's ``get(...) is not`` does.

``tests/test_fast.py`` checks, over changed inputs and frequency state,
that the compiled function answers exactly when the rule does, with the
same output. Each function keeps its source as ``__source__``.
"""

from __future__ import annotations

import torch

from rope_patch.cache import bounds
from rope_patch.cache.table import INDEX_DTYPES
from rope_patch.cache.watch import IMMUTABLE, MISSING
from rope_patch.identity import bits


def answer_for(table, form, dtype: torch.dtype):
    """The compiled answer of ``form`` for calls of ``dtype``, made on first
    use and kept on the table (for its current watch)."""
    answer = table.answers.get((form.dims, dtype))
    if answer is None:
        answer = table.answers[form.dims, dtype] = compile_answer(table, form, dtype)
    return answer


def compile_answer(table, form, dtype: torch.dtype):
    """The fast path's check-and-gather for ``table`` answering ``form``'s
    layout of calls whose activation has ``dtype``.

    Args:
        table: a Table (its watch as it is now: a new watch needs a new function).
        form: one of its verified forms with position tensors (2-D or 3-D).
        dtype: the activation dtype of the table's key.

    Returns:
        ``answer(module, x, position_ids)``: the forward's output from the
        table, or None when the rule does not let the table answer.
    """
    env: dict[str, object] = {
        "_grad_enabled": torch.is_grad_enabled,
        "_embedding": torch.embedding,
        "_extent": bounds.extent,
        "_equal": torch.equal,
        "_bits": bits,
        "_capturing": torch.cuda.is_current_stream_capturing,
        "_TABLE": table,
        "_FORM": form,
    }

    def constant(value) -> str:
        name = f"_c{len(env)}"
        env[name] = value
        return name

    pair = form.dims == 2 and getattr(form, "layouts", None) is None and getattr(form, "pair", None) is not None
    refuse = [f"x.dtype is not {constant(dtype)}"]
    # Item 7: the layout, index dtype, non-empty, device.
    refuse.append(f"position_ids.ndim != {form.dims}")
    if form.axes:
        refuse.append(f"position_ids.shape[0] != {form.axes}")
    if not pair:
        low, high = INDEX_DTYPES
        refuse.append(f"(position_ids.dtype is not {constant(low)} and position_ids.dtype is not {constant(high)})")
    refuse.append("not position_ids.numel()")
    if table.on_cpu:
        refuse += ["not x.is_cpu", "not position_ids.is_cpu"]
    else:
        device = constant(table.device)
        refuse += [f"x.device != {device}", f"position_ids.device != {device}"]
        if table.device.type == "cuda":
            refuse.append("_capturing()")  # item 8: no table while a CUDA graph is captured
    body = [f"        if {' or '.join(refuse)}:", "            return None"]
    # Items 8 and 10: one reading of the positions' extent serves both.
    if table.bound_check or table.top_from:
        body.append(f"        low, high = _extent(position_ids, {constant(table.owner)}, _TABLE)")
        if table.bound_check:
            body += [f"        if low < 0 or high >= {table.size}:", "            return None"]
        if table.top_from:
            body += [f"        if high < {table.top_from}:", "            return None"]
    # Item 9: the frequency state, as Watch.check reads it.
    watched = _watch_conditions(table.watch, constant)
    if watched:
        body += [f"        if {' or '.join(watched)}:", "            return None"]
    if pair:
        cos, sin = (constant(column) for column in form.pair)
        body.append(f"        return _embedding({cos}, position_ids), _embedding({sin}, position_ids)")
    else:
        body.append("        return _FORM.lookup(module, x, position_ids)")
    source = "\n".join(
        [
            "def answer(module, x, position_ids):",
            "    try:",
            *body,
            "    except (KeyError, IndexError, RuntimeError):",
            "        return None  # a watched entry removed, or positions outside a CPU table",
        ]
    )
    namespace: dict[str, object] = {}
    exec(
        compile(source, f"<rope_patch answer for {table.owner}>", "exec"), env, namespace
    )  # our own source, built above
    answer = namespace["answer"]
    answer.__source__ = source  # type: ignore[attr-defined]
    return answer


def _watch_conditions(watch, constant) -> list[str]:
    """Conditions that are true when ``watch`` no longer holds (Watch.check)."""
    conditions = []
    for container, key, tensor, version, address in watch.tensors:
        c, k, t = constant(container), _key(key, constant), constant(tensor)
        conditions += [
            f"{c}[{k}] is not {t}",
            f"{t}._version != {version}",
            f"{t}.data_ptr() != {address}",
            f"(_grad_enabled() and {t}.requires_grad)",  # grad is off at decode: one read
        ]
    for container, key, value, snapshot in watch.values:
        c, k = constant(container), _key(key, constant)
        if value is MISSING:
            conditions.append(f"{k} in {c}")
            continue
        v = constant(value)
        conditions.append(f"{c}[{k}] is not {v}")
        if snapshot is not IMMUTABLE:
            conditions.append(f"{v} != {constant(snapshot)}")
    for container, key, tensor, address, snapshot in watch.inference:
        c, k, t = constant(container), _key(key, constant), constant(tensor)
        conditions += [
            f"{c}[{k}] is not {t}",
            f"{t}.data_ptr() != {address}",
            f"not _equal(_bits({t}), {constant(snapshot)})",
            f"(_grad_enabled() and {t}.requires_grad)",  # grad is off at decode: one read
        ]
    return conditions


def _key(key, constant) -> str:
    """A dict key in the source: a literal for attribute names (strings)."""
    return repr(key) if type(key) is str else constant(key)
