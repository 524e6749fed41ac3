"""Data/static markers for Object attributes: `data`, `static`, `dataclass`.

An Object attribute is *data* (a pytree child, a State leaf) or *static* (kept
in the GraphDef / the pytree's aux data). spmdnnx decides by content: anything
holding an array, a Variable or an Object is data. These markers override that
per attribute, as Flax NNX 0.12 does:

- ``self.a = nnx.data(1)``: ``a`` is data although it holds a Python int;
- ``self.b = nnx.static(x)``: ``b`` is static (it must hold no data);
- inside a class body, ``a: int = nnx.data()`` / ``b: int = nnx.static()``
  mark the attribute for every instance (these are `dataclasses.field`s, so
  `nnx.dataclass` uses them as fields).

A marker stays with its attribute: assigning a plain value later keeps the
attribute's data/static status.

>>> import jax
>>> from spmdnnx._object import Object
>>> class Foo(Object):
...   def __init__(self):
...     self.a = data(1)
...     self.b = static(2)
>>> jax.tree.leaves(Foo())
[1]
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

_MISSING = dataclasses.MISSING


def _marker(value: Any, is_static: bool, kwargs: dict, name: str) -> Any:
  if value is not _MISSING and kwargs:
    raise TypeError(
        f"nnx.{name}() takes either one positional value (for an attribute "
        "assignment) or dataclass field keyword arguments, not both.")
  metadata = {"nnx_value": value}
  extra = kwargs.pop("metadata", None)
  if extra:
    if "static" in extra:
      raise ValueError(
          f"nnx.{name}(metadata=...) must not contain the key 'static': "
          f"nnx.{name} sets it.")
    metadata.update(extra)
  metadata["static"] = is_static
  return dataclasses.field(**kwargs, metadata=metadata)


def data(value: Any = _MISSING, /, **kwargs: Any) -> Any:
  """Marks an Object attribute as data (a pytree child and a State leaf).

  Assign the result directly: ``self.count = nnx.data(0)``. With no value and
  dataclass field keywords (``default=``, ``default_factory=``...), it is a
  class-level field marker for `dataclass` classes.

  >>> import jax
  >>> from spmdnnx._object import Object
  >>> class Foo(Object):
  ...   def __init__(self):
  ...     self.n = data(3)
  >>> jax.tree.leaves(Foo())
  [3]
  """
  return _marker(value, False, kwargs, "data")


def static(value: Any = _MISSING, /, **kwargs: Any) -> Any:
  """Marks an Object attribute as static (kept in the GraphDef, no data).

  >>> import jax, jax.numpy as jnp
  >>> from spmdnnx._object import Object
  >>> class Foo(Object):
  ...   def __init__(self):
  ...     self.name = static("foo")
  ...     self.x = jnp.ones(())
  >>> len(jax.tree.leaves(Foo()))
  1
  """
  return _marker(value, True, kwargs, "static")


def unwrap_marker(value: Any) -> tuple[Any, bool | None]:
  """``(value, is_data)`` for a `data`/`static` marker, else ``(value, None)``."""
  if isinstance(value, dataclasses.Field) and "nnx_value" in value.metadata:
    return value.metadata["nnx_value"], not value.metadata["static"]
  return value, None


def class_markers(cls: type) -> dict[str, bool]:
  """The class-level data (True) / static (False) markers of `cls` and its bases.

  Read from `data()` / `static()` fields in class bodies and from
  ``Data[...]`` / ``Static[...]`` annotations.

  Raises:
    ValueError: an attribute marked both data and static.
  """
  out: dict[str, bool] = {}
  for base in reversed(cls.__mro__[1:]):
    out.update(getattr(base, "_object__markers", {}) or {})
  own: dict[str, bool] = {}
  for name, ann in cls.__dict__.get("__annotations__", {}).items():
    meta = getattr(ann, "__metadata__", ())
    if _DATA_TAG in meta:
      own[name] = True
    elif _STATIC_TAG in meta:
      own[name] = False
  for name, value in cls.__dict__.items():
    if isinstance(value, dataclasses.Field) and "static" in value.metadata:
      is_data = not value.metadata["static"]
      if own.get(name, is_data) != is_data:
        raise ValueError(
            f"{cls.__name__}.{name} is marked both data and static; keep one marker.")
      own[name] = is_data
  out.update(own)
  return out


_DATA_TAG = "__nnx_data__"
_STATIC_TAG = "__nnx_static__"
A = typing.TypeVar("A")
#: ``x: Data[T]`` marks a class attribute as data (older Flax spelling of `data()`).
Data = typing.Annotated[A, _DATA_TAG]
#: ``x: Static[T]`` marks a class attribute as static.
Static = typing.Annotated[A, _STATIC_TAG]


@typing.dataclass_transform(field_specifiers=(dataclasses.field, data, static))
def dataclass(cls: type | None = None, /, **kwargs: Any) -> Any:
  """`dataclasses.dataclass` for Objects and Modules (fields may use `data`/`static`).

  >>> import jax, jax.numpy as jnp
  >>> from spmdnnx._object import Object
  >>> @dataclass
  ... class Point(Object):
  ...   x: jax.Array
  ...   tag: str = static(default="p")
  >>> p = Point(jnp.ones(2))
  >>> p.tag, len(jax.tree.leaves(p))
  ('p', 1)
  """
  kwargs.setdefault("repr", False)
  if cls is None:
    return lambda c: dataclasses.dataclass(c, **kwargs)
  return dataclasses.dataclass(cls, **kwargs)
