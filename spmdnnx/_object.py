"""Graph objects with reference semantics: `Object` and the `List`/`Dict` containers.

`Object` is the base of every node that holds attributes (Module, Rngs,
Optimizer). Assigning a plain list or dict to an attribute stores a tracked
`List`/`Dict` (subclasses of list/dict, so user code sees no difference).

Tracking exists for speed: lifted transforms cache a traversal of each graph
and reuse it while the graph's structure is unchanged. Objects that belong to
a cached traversal are *watched*; any structural change to a watched object
(setting or deleting an attribute, mutating a watched List/Dict, changing a
Variable's metadata) bumps a global epoch, which invalidates the caches.

Objects are also JAX pytrees (as Flax NNX 0.12's ``nnx.Pytree``): their data
attributes are the children, the rest is static aux data, so
``jax.tree.map(f, module)`` works. A subclass declared with ``pytree=False``
is not registered (JAX then sees it as a leaf). Data vs static follows
content (anything holding an array, Variable or Object is data) unless an
attribute is marked with `nnx.data` / `nnx.static` (see `_pytree`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from spmdnnx import errors
from spmdnnx import _pytree
from spmdnnx import _tracectx as tracectx
from spmdnnx._variables import Variable, bump_epoch, freeze


def _has_tracer(value: Any) -> bool:
  leaves = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, Object))
  return any(isinstance(x, jax.core.Tracer) for x in leaves)


def is_array(x: Any) -> bool:
  """Whether x is an array (jax, numpy, abstract or traced)."""
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or \
      isinstance(x, jax.core.Tracer)


def _stop_at_nodes(x: Any) -> bool:
  return isinstance(x, (Object, Variable)) or is_array(x)


def has_data(value: Any, _active: set | None = None) -> bool:
  """Whether value holds anything that belongs in a State (array, Variable, Object)."""
  if isinstance(value, (Object, Variable)) or is_array(value):
    return True
  if isinstance(value, (str, bytes, int, float, bool, complex, type(None), type)):
    return False
  if isinstance(value, (list, tuple, dict)):
    # A container may hold itself (``d["self"] = d``): visit each one once.
    active = set() if _active is None else _active
    if id(value) in active:
      return False
    active.add(id(value))
    items = value.values() if isinstance(value, dict) else value
    return any(has_data(v, active) for v in items)
  if callable(value) and not hasattr(value, "__dict__"):
    return False
  try:
    leaves = jax.tree.leaves(value, is_leaf=_stop_at_nodes)
  except Exception:  # noqa: BLE001  (unknown objects are static)
    return False
  return len(leaves) != 1 or leaves[0] is not value and has_data(leaves[0])


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
  """Base of attribute-holding graph nodes (Module, Rngs, Optimizer, ...).

  Subclasses are JAX pytrees unless declared ``class Foo(Object, pytree=False)``.
  """

  __slots__ = ("_object__trace", "_object__watched", "_object__explicit", "__dict__",
               "__weakref__")
  _object__markers: dict = {}
  _object__is_pytree: bool = True

  def __init_subclass__(cls, *, pytree: bool = True, **kwargs):
    super().__init_subclass__(**kwargs)
    cls._object__markers = _pytree.class_markers(cls)
    cls._object__is_pytree = bool(pytree)
    if pytree:
      _register_pytree(cls)

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    object.__setattr__(obj, "_object__trace", tracectx.current_frame())
    object.__setattr__(obj, "_object__watched", False)
    object.__setattr__(obj, "_object__explicit", None)
    return obj

  def __setattr__(self, name: str, value: Any) -> None:
    if tracectx.current_frame() is not None:
      _check_trace(self, name, value)
    value, is_data = _pytree.unwrap_marker(value)
    if is_data is not None or name in self._object__markers or (
        self._object__explicit and name in self._object__explicit):
      self._set_status(name, value, is_data)
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

  def _set_status(self, name: str, value: Any, is_data: bool | None) -> None:
    """Records an explicit data/static marker and checks static holds no data."""
    explicit = self._object__explicit
    marked_now = is_data is not None
    if is_data is None:
      is_data = explicit.get(name) if explicit and name in explicit else \
          self._object__markers[name]
    elif explicit is None or explicit.get(name) != is_data:
      explicit = dict(explicit or {})
      explicit[name] = is_data
      object.__setattr__(self, "_object__explicit", explicit)
      if self._object__watched:
        bump_epoch()
    if not is_data and has_data(value):
      # (The phrases match Flax's for code that checks them.)
      how = ("Found data in value" if marked_now else "Found data on value"
             if explicit and name in explicit else "Found unexpected data on value")
      raise errors.GraphError(
          f"{how} of type {type(value).__name__!r} assigned to the static attribute "
          f"{type(self).__name__}.{name} (marked nnx.static): static attributes hold "
          f"no arrays, Variables or Objects. Assign it with nnx.data(...) to make "
          f"{name!r} data.", paths=[(name,)])

  def __delattr__(self, name: str) -> None:
    object.__delattr__(self, name)
    if self._object__explicit and name in self._object__explicit:
      explicit = dict(self._object__explicit)
      del explicit[name]
      object.__setattr__(self, "_object__explicit", explicit or None)
    if self._object__watched:
      bump_epoch()

  def is_data_attribute(self, name: str) -> bool:
    """Whether attribute `name` is data (a pytree child / State leaf) now."""
    explicit = self._object__explicit
    if explicit and name in explicit:
      return explicit[name]
    flag = self._object__markers.get(name)
    if flag is not None:
      return flag
    return has_data(self.__dict__.get(name))

  __hash__ = object.__hash__


class _Aux:
  """Pytree aux data of an Object: attribute names, data mask, static values."""

  __slots__ = ("names", "mask", "statics", "explicit", "_key")

  def __init__(self, names, mask, statics, explicit):
    self.names, self.mask, self.statics, self.explicit = names, mask, statics, explicit
    self._key = None

  def key(self):
    if self._key is None:
      self._key = (self.names, self.mask, freeze(self.statics),
                   None if self.explicit is None else tuple(self.explicit.items()))
    return self._key

  def __eq__(self, other):
    return isinstance(other, _Aux) and self.key() == other.key()

  def __hash__(self):
    return hash(self.key())

  def __repr__(self):
    return f"Aux(data={[n for n, m in zip(self.names, self.mask) if m]})"


_EMPTY: dict = {}


def _by_name(item: tuple) -> str:
  return item[0]


def _flatten_parts(obj: Object):
  """Children (data attributes, in name order, as Flax) and the aux data."""
  names, mask, children, statics = [], [], [], []
  explicit = obj._object__explicit or _EMPTY
  markers = type(obj)._object__markers
  for name, value in sorted(obj.__dict__.items(), key=_by_name):
    names.append(name)
    flag = explicit.get(name)
    if flag is None:
      flag = markers.get(name) if markers else None
      if flag is None:
        flag = isinstance(value, _NODE_TYPES) or has_data(value)
    if flag:
      mask.append(True)
      children.append((name, value))
    else:
      mask.append(False)
      statics.append(value)
  return children, _Aux(tuple(names), tuple(mask), tuple(statics), obj._object__explicit)


def _flatten_with_keys(obj: Object):
  children, aux = _flatten_parts(obj)
  return [(jax.tree_util.GetAttrKey(n), v) for n, v in children], aux


def _flatten(obj: Object):
  children, aux = _flatten_parts(obj)
  return [v for _, v in children], aux


def _make_unflatten(cls):

  def unflatten(aux: _Aux, children):
    obj = object.__new__(cls)
    init_object_slots(obj)
    if aux.explicit:
      object.__setattr__(obj, "_object__explicit", aux.explicit)
    d = obj.__dict__
    it, st = iter(children), iter(aux.statics)
    for name, is_data in zip(aux.names, aux.mask):
      d[name] = next(it) if is_data else next(st)
    return obj

  return unflatten


def _register_pytree(cls: type) -> None:
  jax.tree_util.register_pytree_with_keys(
      cls, _flatten_with_keys, _make_unflatten(cls), _flatten)


_register_pytree(Object)
_NODE_TYPES = (Object, Variable, jax.Array)


def is_pytree_type(cls: type) -> bool:
  """Whether instances of `cls` (an Object type) are JAX pytrees."""
  return cls._object__is_pytree


_MISSING = object()


def _is_array_like(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def init_object_slots(obj: Object) -> None:
  """Initialises internal slots of an Object made without calling __new__."""
  object.__setattr__(obj, "_object__trace", tracectx.current_frame())
  object.__setattr__(obj, "_object__watched", False)
  object.__setattr__(obj, "_object__explicit", None)


def set_explicit(obj: Object, name: str, is_data: bool) -> None:
  """Marks attribute `name` of `obj` data or static (as `nnx.data`/`nnx.static`)."""
  explicit = dict(obj._object__explicit or {})
  explicit[name] = is_data
  object.__setattr__(obj, "_object__explicit", explicit)


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

  def __setattr__(self, name, value):
    if name == "_object__watched":
      object.__setattr__(self, name, value)
    else:
      self[name] = value

  def __delattr__(self, name):
    try:
      del self[name]
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


def _list_flatten_with_keys(xs):
  return [(jax.tree_util.SequenceKey(i), v) for i, v in enumerate(xs)], None


def _list_unflatten(_, children):
  out = List()
  list.extend(out, children)
  return out


def _dict_flatten_with_keys(d):
  keys = tuple(d)
  return [(jax.tree_util.DictKey(k), d[k]) for k in keys], keys


def _dict_unflatten(keys, children):
  out = Dict()
  for k, v in zip(keys, children):
    dict.__setitem__(out, k, v)
  return out


jax.tree_util.register_pytree_with_keys(
    List, _list_flatten_with_keys, _list_unflatten, lambda xs: (list(xs), None))
jax.tree_util.register_pytree_with_keys(
    Dict, _dict_flatten_with_keys, _dict_unflatten, lambda d: (list(d.values()), tuple(d)))
