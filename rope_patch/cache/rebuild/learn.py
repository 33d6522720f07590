"""Learning a rebuild's delta (see rope_patch.cache.rebuild) from the
rebuild itself, on a private copy of the module, proving it on other
lengths, and comparing whole module states bit for bit.

Public: :func:`build` (a table that answers a module's rebuilds),
:class:`Snapshot` and :func:`state_difference` (what the first replay is
checked with).
"""

from __future__ import annotations

import torch

from rope_patch.cache import private
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.rebuild.convention import METHOD, MIN_LEARN, PARAMETERS, REBUILD
from rope_patch.cache.rebuild.delta import (
    ATTRIBUTE,
    BUFFER,
    CONSTANT,
    PARAMETER,
    ROWS,
    SEQ_LEN,
    Entry,
    NotElementwise,
    Program,
    RebuildForm,
)
from rope_patch.cache.table import NotCacheable, Table
from rope_patch.cache.watch import Recorder, Unwatchable
from rope_patch.identity import bits, tensor_difference

_MISSING = object()
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_Tensor = torch.Tensor


class Snapshot:
    """The module's entries (attributes, buffers, parameters by identity),
    its non-persistent buffer names, and its tensors' versions."""

    __slots__ = ("buffers", "nonpersistent", "parameters", "state", "versions")

    def __init__(self, module):
        state = vars(module)
        self.state = dict(state)
        self.buffers = dict(state["_buffers"])
        self.parameters = dict(state["_parameters"])
        self.nonpersistent = set(state["_non_persistent_buffers_set"])
        self.versions = {}
        for value in (*self.state.values(), *self.buffers.values(), *self.parameters.values()):
            if isinstance(value, _Tensor) and not value.is_inference():
                self.versions[id(value)] = (value, value._version)

    def get(self, where: str, key: str):
        return (self.state if where == ATTRIBUTE else self.buffers).get(key, _MISSING)

    def put_back(self, module) -> None:
        """The module's entries as snapshotted (a rebuild writes new objects)."""
        state = vars(module)
        for current, saved in ((state, self.state), (state["_buffers"], self.buffers)):
            for key in set(current) - set(saved):
                del current[key]
            current.update(saved)
        parameters = state["_parameters"]
        if parameters.keys() != self.parameters.keys() or any(
            parameters[k] is not v for k, v in self.parameters.items()
        ):
            parameters.clear()
            parameters.update(self.parameters)
        nonpersistent = state["_non_persistent_buffers_set"]
        if nonpersistent != self.nonpersistent:
            nonpersistent.clear()
            nonpersistent.update(self.nonpersistent)

    def written_since(self, later: Snapshot) -> list[tuple[str, str]]:
        """``(where, key)`` of entries replaced, added or removed between
        this snapshot and ``later`` (parameters: where PARAMETER)."""
        written = []
        for where, old, new in (
            (ATTRIBUTE, self.state, later.state),
            (BUFFER, self.buffers, later.buffers),
            (PARAMETER, self.parameters, later.parameters),
        ):
            written += [
                (where, key)
                for key in sorted(set(old) | set(new))
                if old.get(key, _MISSING) is not new.get(key, _MISSING)
            ]
        return written

    def changed_in_place(self) -> bool:
        """A tensor snapshotted was written in place since (its version moved)."""
        return any(tensor._version != version for tensor, version in self.versions.values())


def _run(original, module, seq_len: int, device, dtype):
    return original(module, **dict(zip(PARAMETERS, (seq_len, device, dtype), strict=True)))


def _learn_entry(where, key, first, second, size, half, columns, persistent) -> Entry:
    """Classify what the rebuild wrote to ``key`` at ``size`` (``first``) and
    ``half`` (``second``); raise NotCacheable when it fits no kind."""
    if type(first) is int and type(second) is int and first == size and second == half:
        return Entry(where, key, SEQ_LEN, persistent=persistent)
    if isinstance(first, _Tensor) and isinstance(second, _Tensor):
        if first.dtype != second.dtype or first.device != second.device:
            raise NotCacheable(f"its cache rebuild ({METHOD}) writes {key} in another dtype or device per seq_len")
        if not (_canonical(first) and _canonical(second)):
            raise NotCacheable(f"its cache rebuild ({METHOD}) writes {key} in a layout that is not contiguous")
        if first.shape == second.shape:
            if not torch.equal(bits(first), bits(second)):
                raise NotElementwise(f"its cache rebuild ({METHOD}) writes {key} with values that depend on seq_len")
            return Entry(where, key, CONSTANT, value=first.detach(), persistent=persistent)
        dims = (
            [d for d in range(first.dim()) if first.shape[d] != second.shape[d]] if first.dim() == second.dim() else []
        )
        if len(dims) != 1 or first.shape[dims[0]] != size or second.shape[dims[0]] != half:
            raise NotCacheable(
                f"its cache rebuild ({METHOD}) writes {key} of shape {tuple(first.shape)} for seq_len={size} and "
                f"{tuple(second.shape)} for seq_len={half}: not one row per position"
            )
        if not torch.equal(bits(first.narrow(dims[0], 0, half)), bits(second)):
            raise NotElementwise(
                f"its cache rebuild ({METHOD}) is not position-elementwise: {key} for seq_len={half} is not the "
                f"first rows of {key} for seq_len={size}"
            )
        columns.append(first.detach())
        return Entry(where, key, ROWS, column=len(columns) - 1, dim=dims[0], persistent=persistent)
    if isinstance(first, _LEAVES) and type(first) is type(second) and first == second:
        return Entry(where, key, CONSTANT, value=first, persistent=persistent)
    raise NotCacheable(
        f"its cache rebuild ({METHOD}) writes {key} = {type(first).__name__} that is neither seq_len, rows of a "
        "table nor the same for every seq_len"
    )


def _canonical(tensor: _Tensor) -> bool:
    """Laid out as ``torch.empty(shape)`` lays it out (strides of size-1 dims included)."""
    expected, stride = [], 1
    for size in reversed(tensor.shape):
        expected.append(stride)
        stride *= size
    return tensor.stride() == tuple(reversed(expected))


def build(module, original, device, dtype, size: int) -> Table:
    """A table of ``size`` positions that answers ``module``'s rebuilds for
    ``device`` and ``dtype``, with its Program (see the module docstring).
    Learnt on a private copy of ``module`` (rope_patch.cache.private): the
    module itself is never written, whatever another thread does with it.

    Raises:
        NotCacheable: the rebuild raised, returned something, wrote an entry
            that fits no kind, changed tensors in place, read something
            that cannot be watched, or differs from its learnt delta on the
            probe lengths.
    """
    if size < MIN_LEARN:
        raise NotCacheable(f"a table of {size} positions is too small to learn its cache rebuild ({METHOD}) from")
    half = size // 2
    try:
        probe = private.private_copy(module, private.learning_class(type(module)))
    except Exception as error:  # a class that cannot be made without its __init__
        raise NotCacheable(f"its cache rebuild ({METHOD}) cannot run on a copy of the module: {error!r}") from error
    before = Snapshot(probe)
    # What a run reads before writing it is an input, what it reads after
    # writing it its own output (private.Writes); the inputs are watched as
    # they were before the runs.
    inputs, problem, afters, returned = {}, None, [], []
    try:
        with exact_numerics(device.type):
            for n in (size, half):
                with Recorder(probe) as recorder, private.Writes(probe, recorder) as writes:
                    returned.append(_run(original, probe, n, device, dtype))
                afters.append(Snapshot(probe))
                inputs.update(writes.inputs())
                problem = problem or recorder.problem
    except Unwatchable as error:
        raise NotCacheable(str(error)) from error
    except Exception as error:
        raise NotCacheable(f"its cache rebuild ({METHOD}) for seq_len={size} raised {error!r}") from error
    finally:
        before.put_back(probe)
    if any(value is not None for value in returned):
        raise NotCacheable(f"its cache rebuild ({METHOD}) returns a value")
    if before.changed_in_place():
        raise NotCacheable(f"its cache rebuild ({METHOD}) changes tensors of the module in place")
    first, second = afters
    written = sorted(set(before.written_since(first)) | set(first.written_since(second)))
    entries: list[Entry]
    columns: list[torch.Tensor]
    entries, columns = [], []
    for where, key in written:
        if where == PARAMETER:
            raise NotCacheable(f"its cache rebuild ({METHOD}) replaces the parameter {key}")
        values = first.get(where, key), second.get(where, key)
        if _MISSING in values:
            raise NotCacheable(f"its cache rebuild ({METHOD}) removes {key}")
        persistent = where == BUFFER and key not in first.nonpersistent
        entries.append(_learn_entry(where, key, *values, size, half, columns, persistent))
    if not columns:
        raise NotCacheable(f"its cache rebuild ({METHOD}) writes no per-position table")
    program = Program(tuple(entries))
    # The watch holds the inputs as they were before the runs (the probe is
    # back there), in the module's own containers.
    reads = Recorder(probe)
    reads.reads, reads.problem = inputs, problem
    try:
        watch = private.moved(reads.watch(), probe, module)
    except Unwatchable as error:
        raise NotCacheable(str(error)) from error
    table = Table(columns, None, size, device, watch, bound_check=False)
    table.owner = id(module)
    _probe(probe, original, program, table, device, dtype, {size, half})
    table.forms[REBUILD] = RebuildForm(program)
    return table


def _probe(module, original, program: Program, table: Table, device, dtype, learnt: set[int]) -> None:
    """The learnt delta against the rebuild itself on other lengths (on
    ``module``, a private copy, put back after each); raises NotCacheable."""
    keys = {(entry.where, entry.key) for entry in program.entries}
    for n in sorted({1, 2, 3, table.size - 1} - learnt):
        if n < 1:
            continue
        before = Snapshot(module)
        try:
            with exact_numerics(device.type):
                _run(original, module, n, device, dtype)
            after = Snapshot(module)
        except Exception as error:  # a length the rebuild refuses: not a table's
            raise NotCacheable(f"its cache rebuild ({METHOD}) for seq_len={n} raised {error!r}") from error
        finally:
            before.put_back(module)
        if set(before.written_since(after)) - keys:
            raise NotCacheable(f"its cache rebuild ({METHOD}) writes other entries for seq_len={n}")
        values = program.values(table.columns, n)
        for entry in program.entries:
            value = values[(entry.where, entry.key)]
            problem = _value_difference(after.get(entry.where, entry.key), value)
            if problem is not None:
                whose = "the first rows of" if entry.kind == ROWS else "what it is for"
                raise NotElementwise(
                    f"its cache rebuild ({METHOD}) is not position-elementwise: {entry.key} for seq_len={n} is not "
                    f"{whose} seq_len={table.size} ({problem})"
                )


def _value_difference(expected, actual) -> str | None:
    if isinstance(expected, _Tensor) or isinstance(actual, _Tensor):
        if not (isinstance(expected, _Tensor) and isinstance(actual, _Tensor)):
            return "not a tensor"
        if expected.requires_grad != actual.requires_grad:
            return "requires_grad differs"
        if expected.is_inference() != actual.is_inference():
            return "inference mode differs"
        return tensor_difference(expected, actual)
    if type(expected) is not type(actual):
        return f"{type(actual).__name__} instead of {type(expected).__name__}"
    try:
        return None if expected == actual else f"{actual!r} instead of {expected!r}"
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return "not comparable"


def state_difference(expected: Snapshot, actual: Snapshot) -> str | None:
    """Why two snapshots of one module differ (every entry), or None."""
    for where, old, new in (
        (ATTRIBUTE, expected.state, actual.state),
        (BUFFER, expected.buffers, actual.buffers),
        (PARAMETER, expected.parameters, actual.parameters),
    ):
        if set(old) != set(new):
            return f"{where} names differ: {sorted(set(old) ^ set(new))}"
        for key, value in old.items():
            if new[key] is not value and not (where == ATTRIBUTE and key in private.CONTAINERS):
                problem = _value_difference(value, new[key])
                if problem is not None:
                    return f"{key}: {problem}"
    if expected.nonpersistent != actual.nonpersistent:
        return "non-persistent buffer names differ"
    return None
