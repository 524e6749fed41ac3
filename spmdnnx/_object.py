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
    if type(value) is List and value._list__flags is not None and True in value._list__flags:
      return True  # an nnx.data(...) item
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

  @property
  def _pytree__nodes(self) -> dict[str, bool]:
    """``{attribute: is_data}`` for this object's attributes (Flax NNX's name)."""
    return {name: self.is_data_attribute(name) for name in self.__dict__}

  @property
  def _pytree__state(self) -> "ObjectState":
    """The object's bookkeeping (Flax NNX's name): the transform it was created in."""
    return ObjectState(self._object__trace)

  __hash__ = object.__hash__


class ObjectState:
  """Bookkeeping of an `Object`, read through ``obj._pytree__state``.

  Attributes:
    trace: the lifted transform frame the object was created in (None: outside).
    initializing: always False (spmdnnx has no lazy initialisation).
  """

  __slots__ = ("trace",)
  initializing = False

  def __init__(self, trace: Any):
    self.trace = trace

  def __repr__(self) -> str:
    return f"ObjectState(trace={self.trace!r})"


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
  """A list attribute of a graph object; mutations are tracked.

  Items may be wrapped in `nnx.data` / `nnx.static` markers (as Flax NNX's
  ``nnx.List``): a ``static`` item is kept in the list's pytree aux data (no
  leaf), a ``data`` item is a leaf even when it is a Python scalar. The list
  stores the unwrapped values.

  >>> import jax
  >>> from spmdnnx._pytree import data, static
  >>> xs = List([data(1), static("tag"), 2])
  >>> xs[1], jax.tree.leaves(xs)
  ('tag', [1, 2])
  """

  __slots__ = ("_object__watched", "_list__flags", "__weakref__")

  def __init__(self, items=()):
    values, flags = _unwrap_items(items)
    super().__init__(track(x) for x in values)
    self._object__watched = False
    self._list__flags = flags

  def _changed(self):
    if self._object__watched:
      bump_epoch()

  def __reduce__(self):
    # copy/deepcopy/pickle rebuild through __init__-free `_rebuild_list`.
    return _rebuild_list, (list(self), self._list__flags)

  def is_data_item(self, index: int) -> bool | None:
    """The marker of item `index`: True (`data`), False (`static`), None (none)."""
    flags = self._list__flags
    return None if flags is None else flags[index]


def _rebuild_list(items: list, flags: list | None) -> List:
  out = List()
  list.extend(out, items)
  out._list__flags = None if flags is None else list(flags)
  return out


def _unwrap_items(items) -> tuple[list, list | None]:
  """Unwraps `data`/`static` markers: ``(values, flags or None when unmarked)``."""
  values, flags = [], None
  for x in items:
    x, is_data = _pytree.unwrap_marker(x)
    if is_data is False and has_data(x):
      raise errors.GraphError(
          f"Found data in value of type {type(x).__name__!r} marked nnx.static(...) "
          f"as item {len(values)} of an nnx.List: static items hold no arrays, "
          "Variables or Objects. Drop the nnx.static marker, or use nnx.data(...).",
          paths=[(len(values),)])
    if is_data is not None and flags is None:
      flags = [None] * len(values)
    if flags is not None:
      flags.append(is_data)
    values.append(x)
  return values, flags


def _flags_of(xs: List, n_before: int, new_flags: list | None) -> list | None:
  """The flags list of `xs` (created for its `n_before` items when new items carry markers)."""
  flags = xs._list__flags
  if flags is None and new_flags is None:
    return None
  if flags is None:
    flags = [None] * n_before
    xs._list__flags = flags
  return flags


def _list_append(self, x):
  (x,), new = _unwrap_items((x,))
  flags = _flags_of(self, len(self), new)
  list.append(self, x)
  if flags is not None:
    flags.append(new[0] if new else None)
  self._changed()


def _list_extend(self, xs):
  values, new = _unwrap_items(list(xs))
  flags = _flags_of(self, len(self), new)
  list.extend(self, values)
  if flags is not None:
    flags.extend(new or [None] * len(values))
  self._changed()


def _list_iadd(self, xs):
  _list_extend(self, xs)
  return self


def _list_insert(self, index, x):
  (x,), new = _unwrap_items((x,))
  flags = _flags_of(self, len(self), new)
  list.insert(self, index, x)
  if flags is not None:
    flags.insert(index, new[0] if new else None)
  self._changed()


def _list_setitem(self, index, value):
  if isinstance(index, slice):
    values, new = _unwrap_items(list(value))
    flags = _flags_of(self, len(self), new)
    list.__setitem__(self, index, values)
    if flags is not None:
      flags[index] = new or [None] * len(values)
  else:
    (value,), new = _unwrap_items((value,))
    flags = _flags_of(self, len(self), new)
    list.__setitem__(self, index, value)
    if flags is not None:
      flags[index] = new[0] if new else None
  self._changed()


def _list_delitem(self, index):
  list.__delitem__(self, index)
  if self._list__flags is not None:
    del self._list__flags[index]
  self._changed()


def _list_pop(self, index=-1):
  out = list.pop(self, index)
  if self._list__flags is not None:
    self._list__flags.pop(index)
  self._changed()
  return out


def _list_remove(self, x):
  _list_delitem(self, self.index(x))


def _list_clear(self):
  list.clear(self)
  self._list__flags = None
  self._changed()


def _list_reverse(self):
  list.reverse(self)
  if self._list__flags is not None:
    self._list__flags.reverse()
  self._changed()


def _list_sort(self, *, key=None, reverse=False):
  flags = self._list__flags
  if flags is None:
    list.sort(self, key=key, reverse=reverse)
  else:
    get = (lambda i: key(self[i])) if key is not None else self.__getitem__
    order = sorted(range(len(self)), key=get, reverse=reverse)
    list.__setitem__(self, slice(None), [self[i] for i in order])
    flags[:] = [flags[i] for i in order]
  self._changed()


def _list_imul(self, n):
  list.__imul__(self, n)
  if self._list__flags is not None:
    self._list__flags *= n
  self._changed()
  return self


for _name, _fn in (("append", _list_append), ("extend", _list_extend),
                   ("__iadd__", _list_iadd), ("insert", _list_insert),
                   ("__setitem__", _list_setitem), ("__delitem__", _list_delitem),
                   ("pop", _list_pop), ("remove", _list_remove), ("clear", _list_clear),
                   ("reverse", _list_reverse), ("sort", _list_sort),
                   ("__imul__", _list_imul)):
  _fn.__name__ = _name
  setattr(List, _name, _fn)


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


class _ListAux:
  """Pytree aux data of a List with markers: the flags and the static items."""

  __slots__ = ("flags", "statics", "_key")

  def __init__(self, flags: tuple, statics: tuple):
    self.flags, self.statics = flags, statics
    self._key = (flags, freeze(statics))

  def __eq__(self, other):
    return isinstance(other, _ListAux) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    return f"ListAux(static={list(self.statics)})"


def _list_parts(xs: List) -> tuple[list, Any]:
  flags = xs._list__flags
  if flags is None:
    return list(enumerate(xs)), None
  children = [(i, v) for i, (v, f) in enumerate(zip(xs, flags)) if f is not False]
  statics = tuple(v for v, f in zip(xs, flags) if f is False)
  return children, _ListAux(tuple(flags), statics)


def _list_flatten_with_keys(xs):
  children, aux = _list_parts(xs)
  return [(jax.tree_util.SequenceKey(i), v) for i, v in children], aux


def _list_flatten(xs):
  if xs._list__flags is None:
    return list(xs), None
  children, aux = _list_parts(xs)
  return [v for _, v in children], aux


def _list_unflatten(aux, children):
  out = List()
  if aux is None:
    list.extend(out, children)
    return out
  it, st = iter(children), iter(aux.statics)
  list.extend(out, [next(st) if f is False else next(it) for f in aux.flags])
  out._list__flags = list(aux.flags)
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
    List, _list_flatten_with_keys, _list_unflatten, _list_flatten)
jax.tree_util.register_pytree_with_keys(
    Dict, _dict_flatten_with_keys, _dict_unflatten, lambda d: (list(d.values()), tuple(d)))
