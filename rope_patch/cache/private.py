"""Private copies of a module: where rope_patch.cache.rebuild learns and
checks a cache rebuild without touching the module the user holds.

Learning runs the rebuild at sizes nobody asked for (the table's, its half,
1, 2, 3, ...). Run on the live module, another thread's forward could see
it shrunk (``max_seq_len_cached = 1``) and take another path, and a fork()
in the middle would leave the child the probe's state. A private copy is a
module of the same class (or a subclass of it) whose ``__dict__``,
``_buffers``, ``_parameters``, ``_modules`` and non-persistent buffer
names are new containers holding the same objects: what a rebuild assigns
or registers lands there only. Tensors are shared, not cloned (cloning
would change their identity, grad and inference flags, which the rebuild
may read): a rebuild that changes one in place is refused, but that change
reaches the live tensor, as running it on the live module did.
"""

from __future__ import annotations

import copy

from rope_patch.cache.watch import Watch

#: The module's own containers: copied, never shared, in a private copy.
CONTAINERS = ("_buffers", "_parameters", "_modules", "_non_persistent_buffers_set")


def private_copy(module, cls: type | None = None):
    """A module of class ``cls`` (default: ``module``'s) with ``module``'s
    state in containers of its own (see the module docstring). Raises what
    ``cls.__new__`` raises for a class that cannot be made this way."""
    cls = cls or type(module)
    twin = cls.__new__(cls)
    state = vars(twin)
    state.update(vars(module))
    for name in CONTAINERS:
        if name in state:
            state[name] = copy.copy(state[name])
    return twin


def moved(watch: Watch, source, target) -> Watch:
    """``watch``, armed on the private copy ``source``, over ``target``'s
    containers: the same objects, versions and values, looked up where the
    table answers (a config is shared by both, and stays)."""
    mapping = {id(vars(source)[name]): vars(target)[name] for name in ("_buffers", "_parameters")}
    mapping[id(vars(source))] = vars(target)

    def move(entries):
        return [(mapping.get(id(entry[0]), entry[0]), *entry[1:]) for entry in entries]

    return Watch(move(watch.tensors), move(watch.inference), move(watch.values), watch.snapshots)
