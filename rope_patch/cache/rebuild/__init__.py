"""Rotaries that rebuild their own cache: the Llama-2-era convention of
remote code (InternLM2, DeepSeek-V2/V3, MiniCPM, ...), answered from tables.
The convention is stated here and nowhere else::

    def _set_cos_sin_cache(self, seq_len, device, dtype):   # the rebuild
        self.max_seq_len_cached = seq_len
        ...  # cos/sin for positions 0 .. seq_len-1 from the frequency state
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)

A forward that slices a cache built once (InternLM2: in ``__init__``, for
``max_position_embeddings``) already answers from it; one whose
``__init__`` leaves ``max_seq_len_cached = None`` (DeepSeek-V3) rebuilds it
for the whole sequence at every new length, i.e. at every decode step.

So the rebuild is what rope_patch answers, not the forward: the class's
``_set_cos_sin_cache`` is replaced (per class, as forwards are; the
original on ``__wrapped__``, removed by ``unpatch()``, nothing stored on the
module), and the forward is left as it is: its own code, condition and
slicing, at its own cost on calls within its cache. A rebuild called from
the forward (its caller's frame says so) is treated as a pure function of
``(seq_len, device, dtype)`` and the frequency state it reads (recorded by
rope_patch.cache.watch) to a *state delta*: the entries it writes. The
delta is learnt from the rebuild itself, run at the table's size ``S`` and
at ``S // 2`` (state put back after, as for table builds); each entry is

- ``= seq_len`` (an int: ``max_seq_len_cached``);
- the first ``seq_len`` rows of a table column (a tensor, rows along one
  dimension, canonical contiguous layout: ``cos_cached``, ``sin_cached``);
- a value that does not depend on ``seq_len`` (YaRN re-registers the same
  ``inv_freq``; tensors are copied per replay, as the rebuild makes new ones).

It is then proven on other lengths (1, 2, 3, ``S - 1``: same entries, bit
for bit), and the first real rebuild of each table is compared with the
unpatched one: every attribute, buffer and parameter of the module, bit for
bit. A replay writes what the rebuild would have written: fresh copies of
the rows, so the module's own state is exactly what unpatched leaves, and
the table never aliases it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import torch

from rope_patch.cache import engine, private, rule, shared
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.table import NotCacheable, Table, table_size
from rope_patch.cache.watch import Recorder, Unwatchable
from rope_patch.identity import bits, tensor_difference

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

_MISSING = object()
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_Tensor = torch.Tensor
_CONTIGUOUS = torch.contiguous_format
_steps_aside = rule.steps_aside
_getframe = sys._getframe
_capturing = rule.capturing


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
    from rope_patch.forward import original_of

    method = getattr(cls, METHOD, None)
    return original_of(method) is not None and not getattr(method, "__rope_patch_retired__", True)


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
    from rope_patch.forward import _mark, _wraps

    retired: list[bool] = []  # non-empty once retired (rope_patch.forward.retire)
    states = engine.states
    hooks = getattr(torch.nn.modules.module, "_global_buffer_registration_hooks", {})

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if (
            _steps_aside()  # first: under dynamo nothing below is traced
            or not _called_by_forward(_getframe(1), self)
            or retired
            or hooks  # register_buffer would run them; a replay would not
            or (getattr(type(self), METHOD) is not method and not _wraps(getattr(type(self), METHOD), method))
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
        return _slow(self, original, seq_len, device, dtype, args, kwargs)

    return _mark(method, original, retired)


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


# --------------------------------------------------------------------------
# The delta: what a rebuild writes, as a function of seq_len

SEQ_LEN, ROWS, CONSTANT = "= seq_len", "rows", "constant"


class NotElementwise(NotCacheable):
    """The rebuild's output for one length is not the first rows of its
    output for a larger one (dynamic NTK past its original maximum)."""


#: Where an entry lives: the module's ``__dict__`` or its ``_buffers``.
ATTRIBUTE, BUFFER, PARAMETER = shared.ATTRIBUTE, shared.BUFFER, shared.PARAMETER


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry a rebuild writes.

    Attributes:
        where: ATTRIBUTE or BUFFER.
        key: its name.
        kind: SEQ_LEN, ROWS (the first seq_len rows of ``columns[column]``
            along ``dim``) or CONSTANT (``value``; a tensor is copied per replay).
        persistent: for buffers, whether the rebuild registered it persistent.
    """

    where: str
    key: str
    kind: str
    column: int = -1
    dim: int = 0
    value: object = None
    persistent: bool = False


class Program:
    """A rebuild's delta (its entries), replayed from a table's columns.
    Holds no module and no column: tables of equal frequency state can share it.

    The entries are also kept split by kind, so that a replay (once per
    rebuild, i.e. per decode step for DeepSeek-V3) only copies and assigns.
    """

    __slots__ = ("constants", "copies", "entries", "nonpersistent", "persistent", "rows", "seq_lens")

    def __init__(self, entries: tuple[Entry, ...]):
        self.entries = entries
        own = {ATTRIBUTE: False, BUFFER: True}
        #: (in _buffers, key, column, dim)
        self.rows = tuple((own[e.where], e.key, e.column, e.dim) for e in entries if e.kind == ROWS)
        #: (in _buffers, key)
        self.seq_lens = tuple((own[e.where], e.key) for e in entries if e.kind == SEQ_LEN)
        #: (in _buffers, key, tensor): copied per replay, as the rebuild makes a new one
        self.copies = tuple(
            (own[e.where], e.key, e.value) for e in entries if e.kind == CONSTANT and isinstance(e.value, _Tensor)
        )
        #: (in _buffers, key, value): immutable values
        self.constants = tuple(
            (own[e.where], e.key, e.value) for e in entries if e.kind == CONSTANT and not isinstance(e.value, _Tensor)
        )
        self.persistent = frozenset(e.key for e in entries if e.where == BUFFER and e.persistent)
        self.nonpersistent = frozenset(e.key for e in entries if e.where == BUFFER and not e.persistent)

    def values(self, columns, seq_len: int) -> dict:
        """``(where, key) -> value`` the rebuild writes for ``seq_len``: fresh tensors."""
        out = {}
        for entry in self.entries:
            if entry.kind == SEQ_LEN:
                value: object = seq_len
            elif entry.kind == ROWS:
                value = columns[entry.column].narrow(entry.dim, 0, seq_len).clone(memory_format=_CONTIGUOUS)
            elif isinstance(entry.value, _Tensor):
                value = entry.value.clone(memory_format=_CONTIGUOUS)
            else:
                value = entry.value
            out[(entry.where, entry.key)] = value
        return out

    def replay(self, module, columns, seq_len: int) -> None:
        """Write what the rebuild writes for ``seq_len`` into ``module``
        (what :meth:`values` gives, without building it)."""
        state = module.__dict__
        containers = (state, state["_buffers"])
        for in_buffers, key, column, dim in self.rows:
            containers[in_buffers][key] = columns[column].narrow(dim, 0, seq_len).clone(memory_format=_CONTIGUOUS)
        for in_buffers, key in self.seq_lens:
            containers[in_buffers][key] = seq_len
        for in_buffers, key, value in self.copies:
            containers[in_buffers][key] = value.clone(memory_format=_CONTIGUOUS)
        for in_buffers, key, constant in self.constants:
            containers[in_buffers][key] = constant
        if self.persistent or self.nonpersistent:
            names = state["_non_persistent_buffers_set"]
            names.difference_update(self.persistent)
            names.update(self.nonpersistent)


class RebuildForm:
    """How a table answers a module's rebuilds (its key in ``Table.forms``
    is REBUILD): the shared Program, and this module's own verification."""

    name = REBUILD
    dims = -1  # no position tensor
    axes = 0
    __slots__ = ("program", "verified")

    def __init__(self, program: Program):
        self.program = program
        self.verified = False

    def nbytes(self) -> int:
        return sum(
            entry.value.numel() * entry.value.element_size()
            for entry in self.program.entries
            if isinstance(entry.value, _Tensor)
        )


# --------------------------------------------------------------------------
# Learning the delta


class _Snapshot:
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

    def written_since(self, later: _Snapshot) -> list[tuple[str, str]]:
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
    before = _Snapshot(probe)
    # What a run reads before writing it is an input, what it reads after
    # writing it its own output (private.Writes); the inputs are watched as
    # they were before the runs.
    inputs, problem, afters, returned = {}, None, [], []
    try:
        with exact_numerics(device.type):
            for n in (size, half):
                with Recorder(probe) as recorder, private.Writes(probe, recorder) as writes:
                    returned.append(_run(original, probe, n, device, dtype))
                afters.append(_Snapshot(probe))
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
        before = _Snapshot(module)
        try:
            with exact_numerics(device.type):
                _run(original, module, n, device, dtype)
            after = _Snapshot(module)
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


def _state_difference(expected: _Snapshot, actual: _Snapshot) -> str | None:
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


# --------------------------------------------------------------------------
# The slow path


def _slow(module, original, seq_len: int, device, dtype, args, kwargs):
    """A rebuild the fast path above did not answer. Same effect, or same
    exception, as ``original(module, *args, **kwargs)``."""
    if seq_len <= 0 or device.type == "meta" or _capturing(device):
        return original(module, *args, **kwargs)
    state = engine.state_for(module)
    if state.fallback is not None:
        return original(module, *args, **kwargs)
    with state.lock:
        key = (device, dtype, None)
        table = engine._current_table(state, key)
        if table is not None and table.watch.needs_grad():
            return original(module, *args, **kwargs)  # autograd must see the unpatched graph
        if seq_len > state.cap:
            if state.capped is not None:
                engine.hand_over(module, state.capped)
            return original(module, *args, **kwargs)
        if table is None or seq_len > table.size:
            table = _build(state, module, original, device, dtype, seq_len, args, kwargs)
            if table is None:
                return original(module, *args, **kwargs)
            state.tables[key] = table
        form = table.forms[REBUILD]
        if not form.verified:
            return _verify_first_use(state, module, original, table, form, seq_len, args, kwargs)
        form.program.replay(module, table.columns, seq_len)
        return None


def _build(state, module, original, device, dtype, needed: int, args, kwargs):
    """A table covering ``needed`` positions, or None (the call is then
    computed unpatched; the module is disabled when no table can be learnt)."""
    key = (device, dtype, None)
    engine._drop_stale(state, key)
    table = shared.adopt(module, shared.REBUILD, key, needed, state.cap, _sharing_table(module, device))
    if table is not None:
        return table
    # Not pre-sized in sync-free mode: a rebuild's seq_len is a host int, there
    # is no bound to check on the device.
    size = table_size(needed, state.cap, None)

    def attempt(n):
        table = build(module, original, device, dtype, n)
        shared.publish(module, shared.REBUILD, key, table, table.forms[REBUILD].program)
        return table

    try:
        return attempt(size)
    except NotCacheable as error:
        problem = error
    if isinstance(problem, NotElementwise):
        # Not position-elementwise past some length (dynamic NTK: the
        # frequencies follow seq_len past max_position_embeddings): tables
        # stop below it, longer rebuilds are computed unpatched.
        table, above = engine.largest_table(attempt, size - 1)
        if table is not None:
            engine.cap(state, table.size, above or problem)
            if table.size >= needed:
                return table
            engine.hand_over(module, state.capped)
            return None
    engine._disable(module, state, str(problem))
    return None


def _sharing_table(module, device):
    """``make`` for shared.adopt: this module's table on a group's columns
    and Program, verified on its own first rebuild."""

    def make(group, watch):
        table = Table(group.columns, None, group.size, device, watch, bound_check=False)
        table.owner = id(module)
        table.forms[REBUILD] = RebuildForm(group.payload)
        return table

    return make


def _verify_first_use(state, module, original, table, form: RebuildForm, seq_len: int, args, kwargs):
    """The first replay of this table against the real rebuild: the
    module's whole state after each, bit for bit. The replay (and the exact
    rerun) are made on private copies of the state the call starts from;
    the module itself only sees the real rebuild."""
    start = private.private_copy(module)
    replayed = private.private_copy(start)
    form.program.replay(replayed, table.columns, seq_len)
    result = original(module, *args, **kwargs)
    problem = _state_difference(_Snapshot(module), _Snapshot(replayed))
    if problem is not None:
        # Under TF32 or autocast the unpatched values may be rounded; the
        # table holds the exact ones, which is what we promise there.
        exact = private.private_copy(start)
        with exact_numerics(table.device.type):
            original(exact, *args, **kwargs)
        if _state_difference(_Snapshot(exact), _Snapshot(replayed)) is not None:
            engine._disable(
                module, state, f"its first cache rebuild differs from the unpatched one: {problem}", mismatch=True
            )
            return result
    form.verified = True
    engine.mark_answered(module)
    return result
