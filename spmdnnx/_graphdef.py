"""Typed node specs: the records a `GraphDef` is made of.

`graph.flatten` describes every position of a graph by one spec record; each
kind of position has its own record type with named fields:

- `NodeSpec`: an Object, a List/Dict/list/dict (with identity, ``index``) or
  a tuple (no identity, ``index`` None), with its ``(key, spec)`` children;
- `VariableSpec`: a Variable: its type, index and frozen metadata;
- `RefSpec`: a second reference to the node with that index (sharing, cycles);
- `ArraySpec`: a raw array stored directly in the graph (a State leaf);
- `StaticSpec`: a value with no data, kept in the GraphDef (hashable wrapper);
- `PytreeSpec`: a registered pytree (dataclass, namedtuple...) holding data:
  its one-level treedef, child keys and child specs.

Records are tuples underneath (cheap to build and hash) but compare equal only
to records of the same kind, so two different kinds never collide.

>>> NodeSpec(list, 0, ()) == NodeSpec(list, 0, ())
True
>>> RefSpec(0) == (0,)
False
"""

from __future__ import annotations

from typing import Any, NamedTuple

from spmdnnx._variables import freeze


class _Record:
  """Mixin: equality and hash that include the record's kind."""

  __slots__ = ()

  def __eq__(self, other):
    return type(other) is type(self) and tuple.__eq__(self, other)

  def __ne__(self, other):
    return not self.__eq__(other)

  def __hash__(self):
    return hash((type(self).__name__, tuple.__hash__(self)))


class _NodeFields(NamedTuple):
  type: type
  index: int | None          # None for tuples (no identity)
  children: tuple            # ((key, spec), ...)


class NodeSpec(_Record, _NodeFields):
  """An Object, list/dict (tracked or not) or tuple, and its children."""

  __slots__ = ()


class _VariableFields(NamedTuple):
  type: type
  index: int
  metadata: tuple            # Variable.frozen_metadata()


class VariableSpec(_Record, _VariableFields):
  """A Variable: its type, its node index and its frozen metadata."""

  __slots__ = ()


class _RefFields(NamedTuple):
  index: int


class RefSpec(_Record, _RefFields):
  """A repeated reference to the node (or Variable) with this index."""

  __slots__ = ()


class _ArrayFields(NamedTuple):
  pass


class ArraySpec(_Record, _ArrayFields):
  """A raw array stored on a graph node; its value is a State leaf."""

  __slots__ = ()


class _StaticFields(NamedTuple):
  value: "Static"


class StaticSpec(_Record, _StaticFields):
  """A value that holds no data (ints, strings, functions...), kept as is."""

  __slots__ = ()


class _PytreeFields(NamedTuple):
  treedef: Any               # one-level treedef: children are its leaves
  keys: tuple                # one key per child
  children: tuple            # one spec per child


class PytreeSpec(_Record, _PytreeFields):
  """A registered pytree holding data (a dataclass, a namedtuple...)."""

  __slots__ = ()


class Static:
  """Hashable wrapper around a static value (compared by frozen content)."""

  __slots__ = ("value", "_key")

  def __init__(self, value):
    self.value = value
    self._key = freeze(value)

  def __eq__(self, other):
    return isinstance(other, Static) and type(other.value) is type(self.value) \
        and other._key == self._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    return repr(self.value)


def repr_spec(spec: Any, depth: int) -> str:
  """An indented, readable rendering of a spec tree."""
  pad = "  " * depth
  kind = type(spec)
  if kind is NodeSpec:
    lines = [f"{pad}{spec.type.__name__}("]
    for key, sub in spec.children:
      lines.append(f"{pad}  {key!r}:")
      lines.append(repr_spec(sub, depth + 2))
    lines.append(f"{pad})")
    return "\n".join(lines)
  if kind is VariableSpec:
    meta = ", ".join(f"{k}={v!r}" for k, v in spec.metadata)
    return f"{pad}{spec.type.__name__}({meta})"
  if kind is RefSpec:
    return f"{pad}<shared #{spec.index}>"
  if kind is ArraySpec:
    return f"{pad}<array>"
  if kind is PytreeSpec:
    lines = [f"{pad}pytree {spec.treedef}("]
    for key, sub in zip(spec.keys, spec.children):
      lines.append(f"{pad}  {key!r}:")
      lines.append(repr_spec(sub, depth + 2))
    lines.append(f"{pad})")
    return "\n".join(lines)
  return f"{pad}{spec.value!r}"
