"""What a rotary forward reads, recorded while a table is built, and the
per-call check that it still reads the same: the module's *frequency state*.

A table holds what the forward returned for one frequency state, so it may
answer a call only while every value the forward read is what it was:

- tensors (buffers, parameters, tensor attributes): the same object, at the
  same storage address and in-place version counter. Tensors made under
  ``torch.inference_mode()`` have no version counter: their bits are
  compared instead (they are small: inv_freq is head_dim/2 numbers).
- plain values (floats, strings, functions): the same object; containers
  (lists, dicts, tuples): the same object with equal contents.
- the module's config: every attribute the forward read through it, as
  above (a recording stand-in is handed to the forward for ``self.config``).

Grad is part of the check: a tensor the forward read that requires grad
stops the table while grad mode is on, so autograd records the unpatched
graph (learnable RoPE parameters, ``inv_freq.requires_grad_()``).

When the check fails, :meth:`Watch.rearmed` compares values: equal copies
(accelerate's offload hooks swap in a fresh copy of every buffer per call,
``load_state_dict`` of the same values) keep the table. A read that cannot
be watched this way (a submodule, a method of the config, an arbitrary
object) raises :class:`Unwatchable` naming it, and the module is never
cached.

Not seen: in-place edits through ``.data`` (``t.data.mul_(2)`` bumps no
version counter; only the values could tell, and comparing them on every
call costs more than the table saves at decode; see BENCHMARKS.md).
Assigning ``t.data = other`` is seen (the storage address changes).

Public: :class:`Watch`, :class:`Recorder`, :class:`Unwatchable`,
:func:`disguised_subclass`, and the two markers a watch's entries hold,
:data:`MISSING` (an entry absent from its container) and :data:`IMMUTABLE`
(a value whose identity is enough), which the compiled answers
(rope_patch.cache.fast) test against.
"""

from __future__ import annotations

import copy
import threading
import types
import weakref
from typing import TYPE_CHECKING

import torch

from rope_patch.identity import bits

if TYPE_CHECKING:
    from typing import Any

    #: Where a read value lives: a module's ``__dict__``, ``_buffers`` or
    #: ``_parameters``, or a config's ``__dict__``.
    _Container = dict[str, Any]
    #: Watch.tensors entries: (container, key, tensor, version, address).
    _TensorRead = tuple[_Container, str, torch.Tensor, int, int]
    #: Watch.inference entries: (container, key, tensor, address, snapshot).
    _InferenceRead = tuple[_Container, str, torch.Tensor, int, torch.Tensor]

#: Stands for an entry absent from its container.
MISSING = object()
#: Marks a value whose identity is enough (immutable).
IMMUTABLE = object()
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, staticmethod, classmethod)
_CONTAINERS = (list, tuple, dict, set, frozenset)
_grad_enabled = torch.is_grad_enabled


class Unwatchable(Exception):
    """The forward reads something whose changes cannot be watched; the
    message names it."""


class Watch:
    """The frequency state a table was built from, checked per call.

    Attributes:
        tensors: ``(container, key, tensor, version, address)`` per tensor
            with a version counter; ``container`` is the module's
            ``_buffers``, ``_parameters`` or ``__dict__``.
        inference: ``(container, key, tensor, address, snapshot)`` per
            inference tensor (no version counter: compared by bits).
        values: ``(container, key, value, snapshot)`` per other value read;
            ``snapshot`` is a deep copy for containers, or ``IMMUTABLE``.
    """

    __slots__ = ("holds", "inference", "snapshots", "tensors", "values")

    def __init__(self, tensors=(), inference=(), values=(), snapshots=None):
        self.tensors = tuple(tensors)
        self.inference = tuple(inference)
        self.values = tuple(values)
        #: id(tensor) at record time -> a copy of its values, for rearmed().
        self.snapshots = snapshots or {}
        #: the per-call check (see check()); the common shape, one buffer and
        #: a few plain values, gets a loop-free version of it
        self.holds = _one_buffer_check(self) or self.check

    def check(self, grad: bool = True) -> bool:
        """Everything read is unchanged (identity, address and version; bits
        for inference tensors; contents for containers) and, unless ``grad``
        is False, no read tensor needs autograd now. The per-call check."""
        for container, key, tensor, version, address in self.tensors:
            if container.get(key) is not tensor or tensor._version != version or tensor.data_ptr() != address:
                return False
            if grad and tensor.requires_grad and _grad_enabled():
                return False
        for container, key, value, snapshot in self.values:
            if container.get(key, MISSING) is not value:
                return False
            if snapshot is not IMMUTABLE and value != snapshot:
                return False
        for container, key, tensor, address, snapshot in self.inference:
            if container.get(key) is not tensor or tensor.data_ptr() != address:
                return False
            if not torch.equal(bits(tensor), snapshot):
                return False
            if grad and tensor.requires_grad and _grad_enabled():
                return False
        return True

    def needs_grad(self) -> bool:
        """Grad is enabled and a tensor the forward read requires it: the
        call must build the unpatched autograd graph."""
        return _grad_enabled() and any(entry[2].requires_grad for entry in (*self.tensors, *self.inference))

    def rearmed(self) -> Watch | None:
        """A Watch of the module's current objects when their values equal
        the recorded ones (bit for bit), else None. Used on the slow path
        after :meth:`holds` failed."""
        tensors: list[_TensorRead]
        inference: list[_InferenceRead]
        tensors, inference = [], []
        for container, key, tensor, *_ in (*self.tensors, *self.inference):
            current = container.get(key)
            if not _same_tensor_values(current, self.snapshots[id(tensor)]):
                return None
            if current.requires_grad and _grad_enabled():
                return None
            _arm_tensor(container, key, current, tensors, inference)
        values = []
        for container, key, value, snapshot in self.values:
            current = container.get(key, MISSING)
            if snapshot is IMMUTABLE:
                if current is not value and not (type(current) is type(value) and current == value):
                    return None
                values.append((container, key, current, IMMUTABLE))
            else:
                if type(current) is not type(snapshot) or current != snapshot:
                    return None
                values.append((container, key, current, snapshot))
        snapshots = {}
        before, after = (*self.tensors, *self.inference), (*tensors, *inference)
        for (_, _, old, *_), (_, _, new, *_) in zip(before, after, strict=True):
            snapshots[id(new)] = self.snapshots[id(old)]
        return Watch(tensors, inference, values, snapshots)


def _one_buffer_check(watch: Watch):
    """:meth:`Watch.check` for one versioned tensor and immutable values (a
    Llama-shaped rotary: inv_freq, attention_scaling, rope_type), without
    loops over tuples: the per-call cost is the fast path's largest part."""
    if len(watch.tensors) != 1 or watch.inference or any(snap is not IMMUTABLE for *_, snap in watch.values):
        return None
    ((container, key, tensor, version, address),) = watch.tensors
    values = tuple((c, k, v) for c, k, v, _ in watch.values)

    def holds(grad: bool = True) -> bool:
        if container.get(key) is not tensor or tensor._version != version or tensor.data_ptr() != address:
            return False
        if grad and tensor.requires_grad and _grad_enabled():
            return False
        return all(c.get(k, MISSING) is v for c, k, v in values)

    return holds


def _arm_tensor(container, key, tensor, tensors: list[_TensorRead], inference: list[_InferenceRead]) -> None:
    if tensor.is_inference():
        inference.append((container, key, tensor, tensor.data_ptr(), bits(tensor).clone()))
    else:
        tensors.append((container, key, tensor, tensor._version, tensor.data_ptr()))


def _same_tensor_values(current, snapshot) -> bool:
    return (
        isinstance(current, torch.Tensor)
        and current.dtype == snapshot.dtype
        and current.shape == snapshot.shape
        and current.device == snapshot.device
        and torch.equal(bits(current), bits(snapshot))
    )


# --------------------------------------------------------------------------
# Recording


class Recorder:
    """Records what a forward reads from ``module`` while it runs in this
    thread, then gives the :class:`Watch` of it.

    Used as a context manager around the forward call. The module's class is
    swapped, for the duration, for a subclass whose attribute access records
    (other threads' reads are not recorded); ``self.config`` is handed out as
    a recording stand-in. What was read is armed when :meth:`watch` is
    called, after the forward returned: the watch holds the state the
    forward left (a rope type's update may replace a buffer it read).
    """

    def __init__(self, module):
        self.module = module
        self.thread = threading.get_ident()
        #: (id(container), key) -> (container, key, label), in reading order
        self.reads: dict = {}
        self.problem: str | None = None
        self._cls = None

    def __enter__(self):
        cls = type(self.module)
        _active[id(self.module)] = self
        try:
            self.module.__class__ = _recording_class(cls)
        except TypeError as error:  # a class whose instances cannot change class
            del _active[id(self.module)]
            raise Unwatchable(f"its reads cannot be recorded: {error}") from error
        self._cls = cls
        return self

    def __exit__(self, *exc):
        self.module.__class__ = self._cls
        _active.pop(id(self.module), None)
        return False

    def watch(self) -> Watch:
        """What was read, armed with the current objects, as a Watch; raises
        Unwatchable naming the first read that cannot be watched."""
        if self.problem is not None:
            raise Unwatchable(self.problem)
        tensors: list[_TensorRead]
        inference: list[_InferenceRead]
        values: list[tuple[_Container, str, object, object]]
        snapshots: dict[int, torch.Tensor]
        tensors, inference, values, snapshots = [], [], [], {}
        for container, key, label in self.reads.values():
            value = container.get(key, MISSING)
            if isinstance(value, torch.Tensor):
                snapshots[id(value)] = value.detach().clone()
                _arm_tensor(container, key, value, tensors, inference)
            elif value is MISSING or _is_config(value) or isinstance(value, (*_LEAVES, *_CODE)):
                values.append((container, key, value, IMMUTABLE))
            else:
                snapshot = _snapshot(value)
                if snapshot is MISSING:
                    raise Unwatchable(
                        f"the forward reads {label}, a {type(value).__name__}, whose changes cannot be seen"
                    )
                values.append((container, key, value, snapshot))
        return Watch(tensors, inference, values, snapshots)

    # -- called by the recording class and the config stand-in

    def attribute(self, module, name: str, value):
        """Record ``module.<name>`` read as ``value``; return what the forward gets."""
        if name.startswith("__"):
            return value
        state = object.__getattribute__(module, "__dict__")
        if name in ("_buffers", "_parameters"):
            for key in value:
                self.record(value, key, value[key], f"self.{key}")
            return value
        if name == "_modules":
            self.unwatchable("the forward reads self._modules")
            return value
        for container in (state, state.get("_buffers", {}), state.get("_parameters", {})):
            if name in container:
                return self.record(container, name, value, f"self.{name}")
        if name in state.get("_modules", {}):
            self.unwatchable(f"the forward reads self.{name}, a submodule")
        return value  # a class attribute: code, not state

    def record(self, container, key, value, label: str):
        """Record one read of ``container[key]`` (classified when :meth:`watch`
        arms it); return what the forward gets."""
        self.reads.setdefault((id(container), key), (container, key, label))
        return _ConfigReads(value, self, label) if _is_config(value) else value

    def missing(self, container, key, label: str) -> None:
        """Record that ``container`` has no ``key`` (the forward relied on that)."""
        self.reads.setdefault((id(container), key), (container, key, label))

    def unwatchable(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem


def _snapshot(value):
    """A deep copy of a container of plain values that compares equal to it,
    or MISSING when there is none (other objects, tensors inside)."""
    if not isinstance(value, _CONTAINERS) or _holds_tensors(value):
        return MISSING
    try:
        snapshot = copy.deepcopy(value)
        return snapshot if snapshot == value else MISSING
    except Exception:  # noqa: BLE001 - not copyable or comparable: not watchable
        return MISSING


def _holds_tensors(value) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(
        isinstance(item, torch.Tensor) or (isinstance(item, _CONTAINERS) and _holds_tensors(item)) for item in items
    )


def _is_config(value) -> bool:
    try:
        from transformers.configuration_utils import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, PretrainedConfig)


class _ConfigReads:
    """Stands in for ``self.config`` while a table is built: every attribute
    read goes to the real config and is recorded against its ``__dict__``.
    ``isinstance`` sees the real class (``__class__``)."""

    __slots__ = ("_config", "_label", "_recorder")

    def __init__(self, config, recorder: Recorder, label: str):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_recorder", recorder)
        object.__setattr__(self, "_label", label)

    # isinstance() sees the config's class: a read-only property standing in
    # for object's writable __class__ is the point.
    @property  # type: ignore[misc]
    def __class__(self):
        return type(object.__getattribute__(self, "_config"))

    def __getattr__(self, name):
        config = object.__getattribute__(self, "_config")
        recorder = object.__getattribute__(self, "_recorder")
        label = f"{object.__getattribute__(self, '_label')}.{name}"
        state = vars(config)
        key = getattr(type(config), "attribute_map", {}).get(name, name)
        if key in state:
            value = getattr(config, name)
            return recorder.record(state, key, value, label)
        try:
            value = getattr(config, name)
        except AttributeError:
            recorder.missing(state, key, label)
            raise
        if isinstance(getattr(type(config), name, None), property) or callable(value):
            recorder.unwatchable(f"the forward calls or computes {label}")
            return value
        recorder.missing(state, key, label)  # a class-level constant, unless the instance sets one later
        return value

    def __setattr__(self, name, value):
        recorder = object.__getattribute__(self, "_recorder")
        recorder.unwatchable(f"the forward writes {object.__getattribute__(self, '_label')}.{name}")
        setattr(object.__getattribute__(self, "_config"), name, value)


def disguised_subclass(cls: type, methods: dict[str, Any]) -> type[Any]:
    """A subclass of ``cls`` with ``methods``, named as ``cls`` (its
    ``__name__``, ``__module__`` and ``__qualname__``): what a module of it
    shows in reprs and messages is its own class's. The classes a module is
    switched to while its reads are recorded (here) or its writes reported
    (rope_patch.cache.private)."""
    return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


#: id(module) -> its Recorder, while one runs.
_active: dict[int, Recorder] = {}
_recording_classes: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _recording_class(cls: type) -> type:
    """``cls`` with attribute reads recorded for modules being recorded."""
    known = _recording_classes.get(cls)
    if known is not None:
        return known
    fallback_getattr = getattr(cls, "__getattr__", None)

    def _note(self, name, value):
        recorder = _active.get(id(self))
        if recorder is None or recorder.thread != threading.get_ident():
            return value
        return recorder.attribute(self, name, value)

    def __getattribute__(self, name):
        return _note(self, name, super(recording, self).__getattribute__(name))

    def __getattr__(self, name):
        try:
            if fallback_getattr is None:
                raise AttributeError(name)
            value = fallback_getattr(self, name)
        except AttributeError:
            recorder = _active.get(id(self))
            if recorder is not None and recorder.thread == threading.get_ident() and not name.startswith("__"):
                # getattr(self, name, default): the forward relies on its absence
                recorder.missing(object.__getattribute__(self, "__dict__"), name, f"self.{name}")
            raise
        return _note(self, name, value)

    recording = disguised_subclass(cls, {"__getattribute__": __getattribute__, "__getattr__": __getattr__})
    _recording_classes[cls] = recording
    return recording
