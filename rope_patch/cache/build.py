"""Building a table: the module's own forward run on ``arange`` positions,
under exact numerics, with its reads recorded (rope_patch.cache.watch)."""

from __future__ import annotations

import torch

from rope_patch.cache.forms import AxesForm, PlanarForm
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.table import NotCacheable, Table
from rope_patch.cache.watch import Recorder, Unwatchable

_MISSING = object()


def build_table(module, forward, x, extra: tuple, size: int, bound_check: bool, axes: int = 0) -> Table:
    """A table of ``size`` positions for ``module`` on x's device and dtype.

    Args:
        forward: the class's forward (without the rope type's state update).
        extra: the call's key arguments (``layer_type``).
        axes: 0 to build from 2-D positions (the table then answers 2-D
            calls, after probing); else from ``axes`` equal rows of 3-D
            positions, for forwards that accept only those.

    Raises:
        NotCacheable: the forward raised, returned something that is not a
            tensor or a tuple/list of tensors shaped like the positions,
            changed the module's state, read something that cannot be
            watched, or differs on the probe positions.
    """
    device = x.device
    form_class = AxesForm if axes else PlanarForm
    positions = AxesForm.build_positions(size, device, axes) if axes else PlanarForm.build_positions(size, device)
    before = _snapshot(module)
    try:
        with exact_numerics(device.type), Recorder(module) as recorder:
            out = forward(module, x, positions, *extra)
    except Unwatchable as error:
        raise NotCacheable(str(error)) from error
    except Exception as error:  # noqa: BLE001 - any failure means "do not cache"
        raise NotCacheable(f"forward on {tuple(positions.shape)} arange positions raised {error!r}") from error
    finally:
        changed = _restore(module, before)
    if changed:
        raise NotCacheable(f"the forward changes the module's own state when called ({', '.join(changed)})")
    try:
        watch = recorder.watch()
    except Unwatchable as error:
        raise NotCacheable(str(error)) from error
    container, outputs = split_outputs(out)
    columns = form_class.columns_of(outputs, size, device)
    table = Table(columns, container, size, device, watch, bound_check)
    if not axes:
        form = PlanarForm(table, forward, extra)
        form.probe(module, x)
        table.forms[2] = form
    with exact_numerics(device.type):
        if not watch.holds():
            raise NotCacheable("the forward changes what it reads (a buffer in place) when called")
    return table


def split_outputs(out):
    """``(container, tensors)``: container is tuple/list, or None for one tensor."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if type(out) in (tuple, list) and out and all(isinstance(t, torch.Tensor) for t in out):
        return type(out), list(out)
    raise NotCacheable(f"forward returns {type(out).__name__}, not a tensor or a tuple of tensors")


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
    for current, saved in zip((state, state.get("_buffers", {}), state.get("_parameters", {})), before):
        for key in set(current) | set(saved):
            if current.get(key, _MISSING) is not saved.get(key, _MISSING):
                changed.append(key)
                if key in saved:
                    current[key] = saved[key]
                else:
                    del current[key]
    return sorted(changed)
