"""Building a table: the module's own forward run on ``arange`` positions
(or ``seq_len = size``), under exact numerics, with its reads recorded
(rope_patch.cache.watch)."""

from __future__ import annotations

from typing import cast

import torch

from rope_patch.cache.forms import AxesForm, PlanarForm, PrefixForm
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.table import NotCacheable, Table
from rope_patch.cache.watch import Recorder, Unwatchable

_MISSING = object()
#: torch functions that only select, move or cast values: a forward that
#: gathers (GATHERS) and runs nothing else already answers from a
#: precomputed buffer. (Work a TorchFunctionMode does not see, in C++ or
#: numpy, leaves no name: such a forward is not taken for a gather.)
MOVES = frozenset(
    {
        "__get__", "__getitem__", "to", "float", "half", "bfloat16", "type", "type_as", "split", "chunk", "unbind",
        "view", "reshape", "contiguous", "expand", "unsqueeze", "squeeze", "transpose", "permute", "narrow",
        "index_select", "embedding", "take", "gather", "clone", "detach", "size", "dim",
    }
)  # fmt: skip
GATHERS = frozenset({"__getitem__", "embedding", "index_select", "gather", "take"})
#: Why a forward that serves its outputs from its own precomputed buffer is
#: left alone, whether it returns views of it (its dtype) or gathered copies
#: (another dtype): one reason for both, so that the runtime and
#: ``rope-patch check`` (which may call it in another dtype) say the same.
OWN_BUFFER = "the forward only gathers rows of its precomputed {}: nothing to gain"


class StateChanged(NotCacheable):
    """The build call replaced, added or removed module state (put back):
    a forward that initialises state on first use, or changes it past some
    positions (dynamic NTK in its own code).

    Attributes:
        names: the entries it changed, comma-separated.
    """

    def __init__(self, message: str, names: str):
        super().__init__(message)
        self.names = names


class _Ops(torch.overrides.TorchFunctionMode):
    """The names of the torch functions the build call runs."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def build_table(module, forward, x, extra: tuple, size: int, bound_check: bool, axes: int = 0, prefix=False) -> Table:
    """A table of ``size`` positions for ``module`` on x's device and dtype.

    Args:
        forward: the class's forward.
        extra: the call's key arguments (``layer_type``).
        axes: build from ``axes`` equal rows of 3-D positions, for forwards
            that accept only those (0: from 2-D positions; the table then
            answers 2-D calls, after probing).
        prefix: the forward takes ``seq_len``: build from ``seq_len = size``.

    Raises:
        NotCacheable: the forward raised, returned something that is not a
            tensor or a tuple/list of tensors shaped like the positions,
            returned slices of its own cache or only gathered from a
            precomputed buffer, changed the module's state,
            read something that cannot be watched, or differs on the probe
            positions.
    """
    device = x.device
    form_class: type[PrefixForm | AxesForm | PlanarForm]
    index: int | torch.Tensor  # seq_len, or position_ids
    if prefix:
        form_class, index = PrefixForm, size
    elif axes:
        form_class, index = AxesForm, AxesForm.build_positions(size, device, axes)
    else:
        form_class, index = PlanarForm, PlanarForm.build_positions(size, device)
    before = _snapshot(module)
    # The activation stands in for its device, dtype and shape only: zeros
    # (an expanded scalar, no memory). The probe then uses ones and the first
    # real call the user's values, so a forward that reads x's values (not a
    # rotary's business) never passes.
    neutral = x.new_zeros(()).expand(x.shape)
    try:
        with exact_numerics(device.type), Recorder(module) as recorder, _Ops() as ops:
            out = forward(module, neutral, index, *extra)
    except Unwatchable as error:
        raise NotCacheable(str(error)) from error
    except Exception as error:
        shown = f"seq_len={size}" if prefix else f"{tuple(cast(torch.Tensor, index).shape)} arange positions"
        raise NotCacheable(f"forward on {shown} raised {error!r}") from error
    finally:
        changed = _restore(module, before)
    if changed:
        shown, names = f"seq_len={size}" if prefix else f"positions 0..{size - 1}", ", ".join(changed)
        raise StateChanged(f"the forward changes the module's own state when called with {shown} ({names})", names)
    try:
        watch = recorder.watch()
    except Unwatchable as error:
        raise NotCacheable(str(error)) from error
    container, outputs = split_outputs(out)
    own = _own_cache(module, outputs)
    if own is not None:
        raise NotCacheable(OWN_BUFFER.format(own))
    if ops.names & GATHERS and ops.names <= MOVES:
        read = ", ".join(sorted(entry[1] for entry in (*watch.tensors, *watch.inference))) or "buffer"
        raise NotCacheable(OWN_BUFFER.format(read))
    columns = form_class.columns_of(outputs, size, device)
    return table_from(module, forward, x, extra, columns, container, size, watch, bound_check, form_class, axes)


def table_from(module, forward, x, extra, columns, container, size, watch, bound_check, form_class, axes=0) -> Table:
    """The table of ``module`` answering from ``columns`` (built from its
    forward, or shared with a module of equal frequency state), its form
    probed against the module's own forward (none for ``axes``: learnt on
    first need). Raises NotCacheable as :func:`build_table`."""
    table = Table(columns, container, size, x.device, watch, bound_check)
    table.owner = id(module)  # not the module: tables must not keep it alive
    if not axes:
        form = form_class(table, forward, extra)
        form.probe(module, x)
        table.forms[form.dims] = form
    with exact_numerics(x.device.type):
        if not watch.holds():
            # Calling it again touched what it reads: only equal values keep
            # the table (longrope's update copies the same set in place).
            table.watch = watch.rearmed()
            if table.watch is None:
                raise NotCacheable("the forward changes the values it reads when called")
    return table


def split_outputs(out):
    """``(container, tensors)``: container is tuple/list, or None for one tensor."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if type(out) in (tuple, list) and out and all(isinstance(t, torch.Tensor) for t in out):
        return type(out), list(out)
    raise NotCacheable(f"forward returns {type(out).__name__}, not a tensor or a tuple of tensors")


def _own_cache(module, outputs) -> str | None:
    """The names of the module tensors outputs are views of (a forward that
    slices its own ``cos_cached``), ", "-joined, or None."""
    storages: dict[int, str] = {}
    for name, value in {**vars(module), **module._buffers}.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            storages[value.untyped_storage().data_ptr()] = name
    names = {storages.get(tensor.untyped_storage().data_ptr()) for tensor in outputs if tensor.device.type != "meta"}
    names.discard(None)
    return ", ".join(sorted(cast("set[str]", names))) if names else None


def _snapshot(module) -> tuple[dict, ...]:
    """The module's attribute, buffer and parameter entries (by identity)."""
    state = vars(module)
    return dict(state), dict(state.get("_buffers", {})), dict(state.get("_parameters", {}))


def _restore(module, before: tuple[dict, ...]) -> list[str]:
    """Put back entries a build call replaced, added or removed (a forward
    that caches by itself, growing its own buffers); return their names.
    The module's state after a patched call must be what an unpatched call
    leaves, and the build call is ours, not the user's."""
    state = vars(module)
    changed = []
    for current, saved in zip((state, state.get("_buffers", {}), state.get("_parameters", {})), before, strict=False):
        for key in set(current) | set(saved):
            if current.get(key, _MISSING) is not saved.get(key, _MISSING):
                changed.append(key)
                if key in saved:
                    current[key] = saved[key]
                else:
                    del current[key]
    return sorted(changed)
