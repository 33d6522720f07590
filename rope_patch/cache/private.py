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

While learning, the copy's class is :func:`learning_class`'s subclass,
which tells the rebuild's inputs from its outputs (see :class:`Writes`).
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch

from rope_patch.cache.watch import Watch, disguised_subclass

#: The module's own containers: copied, never shared, in a private copy.
CONTAINERS = ("_buffers", "_parameters", "_modules", "_non_persistent_buffers_set")


def private_copy(module, cls: type | None = None):
    """A module of class ``cls`` (default: ``module``'s) with ``module``'s
    state in containers of its own (see the module docstring). Raises what
    ``cls.__new__`` raises for a class that cannot be made this way."""
    cls = cls or type(module)
    twin = cls.__new__(cls)  # type: ignore[call-overload]  # a Module class's own __new__, as copy does
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


class Writes:
    """While one run of a rebuild on a learning copy lasts (``with``): the
    keys it writes, and which of them it read first.

    A key read before the run writes it (``if self.inv_freq.dtype !=
    torch.float32: self.inv_freq = self.inv_freq.float()``) is an input: the
    table must be watched on the value it held before the call. A key read
    only after the run wrote it (``self.max_seq_len_cached = seq_len`` then
    ``torch.arange(self.max_seq_len_cached)``) is the run's own output. What
    nn.Module reads itself while it writes (``register_buffer``'s
    ``hasattr(self, name)`` and ``self._buffers``, ``__setattr__``'s
    non-persistent names) is not the rebuild's: the value was computed
    before. Writes that bypass ``__setattr__`` and ``register_buffer``
    (``self.__dict__[key] = ...``) are not seen: their reads stay inputs,
    which only watches more.
    """

    def __init__(self, module, recorder):
        state = vars(module)  # before recording starts: these reads are ours
        self.module = module
        self.recorder = recorder
        self.own = {id(state), id(state["_buffers"]), id(state["_parameters"])}
        self.written: set[str] = set()
        self.read_first: set[str] = set()

    def __enter__(self):
        _active[id(self.module)] = self
        return self

    def __exit__(self, *exc):
        _active.pop(id(self.module), None)
        return False

    def wrote(self, name: str) -> None:
        if name in self.written:
            return
        self.written.add(name)
        if any(key == name and container in self.own for container, key in self.recorder.reads):
            self.read_first.add(name)

    def writing(self, name: str, write):
        """``write()`` (nn.Module's own ``__setattr__``, ``__delattr__`` or
        ``register_buffer`` of ``name``), its own reads not recorded."""
        self.wrote(name)
        reads = self.recorder.reads
        before = set(reads)
        try:
            return write()
        finally:
            for read in [read for read in reads if read not in before]:
                del reads[read]

    def inputs(self) -> dict:
        """The recorder's reads, less those of keys the run wrote before reading them."""
        return {
            (container, key): read
            for (container, key), read in self.recorder.reads.items()
            if container not in self.own or key not in self.written or key in self.read_first
        }


#: id(learning copy) -> its Writes, while a run lasts.
_active: dict[int, Writes] = {}
_learning_classes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def learning_class(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """``cls`` with assignments, deletions and ``register_buffer`` reported
    to the copy's :class:`Writes` while one is active."""
    cached = _learning_classes.get(cls)
    if cached is not None:
        return cached

    def _write(self, name, write):
        writes = _active.get(id(self))
        return write() if writes is None else writes.writing(name, write)

    def __setattr__(self, name, value):
        _write(self, name, functools.partial(cls.__setattr__, self, name, value))

    def __delattr__(self, name):
        _write(self, name, functools.partial(cls.__delattr__, self, name))

    def register_buffer(self, name, tensor, persistent=True):
        return _write(self, name, functools.partial(cls.register_buffer, self, name, tensor, persistent))

    learning = disguised_subclass(
        cls, {"__setattr__": __setattr__, "__delattr__": __delattr__, "register_buffer": register_buffer}
    )
    _learning_classes[cls] = learning
    return learning
