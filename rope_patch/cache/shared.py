"""Tables shared between modules: per-layer rotaries (one per attention
layer, as InternLM2 and DeepSeek-V3 build them) whose frequency state is
equal by value answer from one set of columns.

A table's Watch records what its forward read (rope_patch.cache.watch):
which attribute, buffer, parameter or config value, and its value then.
When another module of the same class needs a table for the same (device,
dtype, key argument), the reads of a published table are looked up on
*that* module (same names, in its own attributes, buffers, parameters and
config) and compared by value, as :meth:`Watch.rearmed` compares a module
with itself: every tensor bit for bit (dtype, shape, device), every plain
value equal. Equal reads mean the forward computes the same table, so the
module answers from the same columns. It keeps its own Watch, over its own
objects (a later change to its ``inv_freq`` is seen on its next call, as
for any table), its own forms, probed against its own forward, and its own
first-call verification; only the columns are shared.

Memory is counted proportionally (rope_patch.cache_info): columns shared by
``k`` modules count ``1/k`` in each, so that the sum over a model is what
is held.
"""

from __future__ import annotations

import os
import threading
import weakref

from rope_patch.cache.watch import Watch

ATTRIBUTE, BUFFER, PARAMETER, CONFIG = "attribute", "buffer", "parameter", "config"
#: What a table answers: a forward (2-D positions or seq_len), or a cache
#: rebuild (rope_patch.cache.rebuild).
FORWARD, REBUILD = "forward", "rebuild"


class Group:
    """One set of columns, the tables answering from them, and what the
    forward read to compute them (by role and name, with the values).

    Attributes:
        columns: the shared column tensors.
        container: the table's output container (tuple, list or None).
        size: positions covered.
        reads: ``(role, key, is_tensor, value, snapshot)``: for tensors a
            copy of the values read (both), for other values what Watch
            keeps (the value, and a deep copy for containers).
        payload: what a table of this kind needs besides the columns (a
            rebuild's Program).
        tables: the live tables answering from ``columns``.
    """

    __slots__ = ("__weakref__", "columns", "container", "payload", "reads", "size", "tables")

    def __init__(self, columns, container, size: int, reads: tuple, payload):
        self.columns = columns
        self.container = container
        self.size = size
        self.reads = reads
        self.payload = payload
        self.tables: weakref.WeakSet = weakref.WeakSet()

    def nbytes(self) -> int:
        return sum(column.numel() * column.element_size() for column in self.columns)


_lock = threading.Lock()
#: (kind, class, table key) -> groups, newest last
_groups: dict[tuple, list[weakref.ref[Group]]] = {}


def _after_fork_in_child() -> None:
    """A fork while another thread held the lock (publishing or adopting a
    table) would leave the child's copy held forever, and its first table
    build waiting on it: the child gets a fresh one (as engine's locks)."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _containers(module) -> dict[str, dict]:
    """role -> the module's container of that role."""
    state = vars(module)
    roles = {ATTRIBUTE: state, BUFFER: state["_buffers"], PARAMETER: state["_parameters"]}
    config_state = getattr(state.get("config"), "__dict__", None)
    if config_state is not None:  # reads of a config without one are not shared
        roles[CONFIG] = config_state
    return roles


def publish(module, kind: str, key, table, payload=None) -> None:
    """Offer ``table`` (just built for ``module``) to other modules of its
    class; a table whose reads cannot all be named (a nested config, a
    submodule's state) is not offered."""
    if table.shared is not None:
        return
    roles = {id(container): role for role, container in _containers(module).items()}
    watch = table.watch
    reads = []
    for container, name, tensor, *_ in (*watch.tensors, *watch.inference):
        role = roles.get(id(container))
        snapshot = watch.snapshots.get(id(tensor))
        if role is None or snapshot is None:
            return
        reads.append((role, name, True, snapshot, snapshot))
    for container, name, value, snapshot in watch.values:
        role = roles.get(id(container))
        if role is None:
            return
        reads.append((role, name, False, value, snapshot))
    group = Group(table.columns, table.container, table.size, tuple(reads), payload)
    group.tables.add(table)
    table.shared = group
    signature = (kind, type(module), key)
    with _lock:
        alive = [ref for ref in _groups.get(signature, ()) if ref() is not None]
        alive.append(weakref.ref(group))
        _groups[signature] = alive


def adopt(module, kind: str, key, needed: int, limit: int, make):
    """A table for ``module`` answering from the columns of a published
    group of its class and key that covers ``needed`` positions (at most
    ``limit``) and whose reads equal the module's; None when there is none.

    Args:
        make: ``make(group, watch)``: the module's own table from the
            group's columns and its own Watch; may raise (the module's
            forward disagrees with the columns, or refuses a probe: not adopted).
    """
    with _lock:
        candidates = [ref() for ref in _groups.get((kind, type(module), key), ())]
    covering = [g for g in candidates if g is not None and needed <= g.size <= limit]
    if not covering:
        return None
    containers = _containers(module)
    for group in sorted(covering, key=lambda g: -g.size):
        watch = _watch_for(group, containers)
        if watch is None:
            continue
        try:
            table = make(group, watch)
        except Exception:  # noqa: BLE001 - NotCacheable, or the module's forward refusing a probe: not adopted
            continue
        table.shared = group
        group.tables.add(table)
        return table
    return None


def _watch_for(group: Group, containers: dict[str, dict]) -> Watch | None:
    """A Watch of the module's own objects under the group's read names,
    when their values equal the group's (Watch.rearmed compares them), else None."""
    tensors, values, snapshots = [], [], {}
    for role, name, is_tensor, value, snapshot in group.reads:
        container = containers.get(role)
        if container is None:
            return None
        if is_tensor:  # the snapshot stands in for the group's tensor (rearmed compares with it)
            tensors.append((container, name, value, -1, -1))
            snapshots[id(value)] = snapshot
        else:
            values.append((container, name, value, snapshot))
    return Watch(tensors, (), values, snapshots).rearmed()


def forget() -> None:
    """Forget every published group (``unpatch``); tables keep their columns."""
    with _lock:
        _groups.clear()
