"""Graph objects with reference semantics: `Object` and the `List`/`Dict` containers.

`Object` is the base of every node that holds attributes (Module, Rngs,
Optimizer). Assigning a plain list or dict to an attribute stores a tracked
`List`/`Dict` (subclasses of list/dict, so user code sees no difference).

Tracking exists for speed: lifted transforms cache a traversal of each graph
and reuse it while the graph's structure is unchanged. Objects that belong to
a cached traversal are *watched*; any structural change to a watched object
(setting or deleting an attribute, mutating a watched List/Dict, changing a
Variable's metadata) bumps a global epoch, which invalidates the caches.
"""

from __future__ import annotations

from typing import Any

import jax

from spmdnnx import errors
from spmdnnx import _tracectx as tracectx
from spmdnnx._variables import Variable, bump_epoch


def _has_tracer(value: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value))


def _check_trace(owner: Any, name: Any, value: Any) -> None:
  frame = tracectx.current_frame()
  if frame is not None and owner._object__trace is not frame and _has_tracer(value):
    raise errors.TraceContextError(
        f"Cannot set {type(owner).__name__}.{name} to a traced value inside "
        f"{frame.name}: this object was created outside the transform, so the "
        "tracer would leak out of it. Pass the object to the transform as an "
        "argument instead of capturing it from an enclosing scope.")


def track(value: Any) -> Any:
  """Converts plain lists/dicts (recursively) to tracked `List`/`Dict`."""
  if type(value) is list:
    return List(value)
  if type(value) is dict:
    return Dict(value)
  return value


class Object:
  """Base of attribute-holding graph nodes (Module, Rngs, Optimizer, ...)."""

  __slots__ = ("_object__trace", "_object__watched", "__dict__", "__weakref__")

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    object.__setattr__(obj, "_object__trace", tracectx.current_frame())
    object.__setattr__(obj, "_object__watched", False)
    return obj

  def __setattr__(self, name: str, value: Any) -> None:
    if tracectx.current_frame() is not None:
      _check_trace(self, name, value)
    current = self.__dict__.get(name, _MISSING)
    if current is value:
      return
    if isinstance(current, Variable) and not isinstance(value, (Variable, Object)) \
        and _is_array_like(value):
      # `self.count = self.count + 1` style: update the Variable in place, like
      # `self.count.value = ...`, so references to the Variable stay valid.
      current.value = value
      return
    object.__setattr__(self, name, track(value))
    if self._object__watched:
      bump_epoch()

  def __delattr__(self, name: str) -> None:
    object.__delattr__(self, name)
    if self._object__watched:
      bump_epoch()

  __hash__ = object.__hash__


_MISSING = object()


def _is_array_like(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def init_object_slots(obj: Object) -> None:
  """Initialises internal slots of an Object made without calling __new__."""
  object.__setattr__(obj, "_object__trace", tracectx.current_frame())
  object.__setattr__(obj, "_object__watched", False)


class List(list):
  """A list attribute of a graph object; mutations are tracked."""

  __slots__ = ("_object__watched", "__weakref__")

  def __init__(self, items=()):
    super().__init__(track(x) for x in items)
    self._object__watched = False

  def _changed(self):
    if self._object__watched:
      bump_epoch()


def _tracked_method(name: str):
  base = getattr(list, name)

  def method(self, *args):
    result = base(self, *args)
    self._changed()
    return result

  method.__name__ = name
  return method


for _m in ("append", "extend", "insert", "pop", "remove", "clear", "sort",
           "reverse", "__setitem__", "__delitem__", "__iadd__", "__imul__"):
  setattr(List, _m, _tracked_method(_m))


class Dict(dict):
  """A dict attribute of a graph object; mutations are tracked."""

  __slots__ = ("_object__watched", "__weakref__")

  def __init__(self, *args, **kwargs):
    super().__init__()
    for k, v in dict(*args, **kwargs).items():
      dict.__setitem__(self, k, track(v))
    self._object__watched = False

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def _changed(self):
    if self._object__watched:
      bump_epoch()


def _tracked_dict_method(name: str):
  base = getattr(dict, name)

  def method(self, *args, **kwargs):
    result = base(self, *args, **kwargs)
    self._changed()
    return result

  method.__name__ = name
  return method


for _m in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update",
           "setdefault", "__ior__"):
  setattr(Dict, _m, _tracked_dict_method(_m))
