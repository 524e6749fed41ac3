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
  its one-level treedef, child keys and child specs;
- `TreeSpec`: a whole tree flattened in tree mode (``graph=False``): its root
  type, JAX treedef, leaf paths and per-leaf Variable kind.

Records are tuples underneath, ``(kind, *fields)`` (cheap to build, hashed and
compared in C), and the kind tag keeps two different kinds from ever being equal.

>>> NodeSpec(list, 0, ()) == NodeSpec(list, 0, ())
True
>>> RefSpec(0).index, RefSpec(0) == (0,)
(0, False)
"""

from __future__ import annotations

import collections
from typing import Any

from spmdnnx._variables import freeze


def _record(name: str, fields: str, doc: str) -> type:
  """A spec record type: a tuple ``(kind, *fields)`` with named fields.

  The kind tag comes first, so tuple equality and hashing (done in C, fast on
  deep GraphDefs) never mix two kinds of record.
  """
  base = collections.namedtuple(name, ("kind " + fields).split())
  kind = name

  def __new__(cls, *values):
    return tuple.__new__(cls, (kind, *values))

  def __repr__(self):
    return f"{name}({', '.join(repr(v) for v in self[1:])})"

  def __getnewargs__(self):  # copy/deepcopy/pickle pass the fields, not the tag
    return tuple(self[1:])

  return type(name, (base,), {"__slots__": (), "__new__": __new__, "__doc__": doc,
                              "__repr__": __repr__, "__module__": __name__,
                              "__getnewargs__": __getnewargs__})


NodeSpec = _record(
    "NodeSpec", "type index children",
    "An Object, list/dict (tracked or not) or tuple (``index`` None), and its "
    "``(key, spec)`` children.")
VariableSpec = _record(
    "VariableSpec", "type index metadata",
    "A Variable: its type, its node index and its frozen metadata.")
RefSpec = _record("RefSpec", "index", "A repeated reference to the node with this index.")
ArraySpec = _record("ArraySpec", "", "A raw array stored on a graph node (a State leaf).")
StaticSpec = _record(
    "StaticSpec", "value",
    "A value that holds no data (ints, strings, functions...), in a `Static` wrapper.")
PytreeSpec = _record(
    "PytreeSpec", "treedef keys children",
    "A registered pytree holding data: its one-level treedef, child keys and specs.")

TreeSpec = _record(
    "TreeSpec", "type treedef paths kinds",
    "A tree-mode graph: root type, JAX treedef (Variables as leaves), the leaf "
    "paths in treedef order and, per leaf, ``(Variable type, frozen metadata)`` "
    "or None for a raw leaf.")


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
  if kind is TreeSpec:
    lines = [f"{pad}tree {spec.type.__name__}("]
    for path, k in zip(spec.paths, spec.kinds):
      what = "<leaf>" if k is None else f"{k[0].__name__}()"
      lines.append(f"{pad}  {'/'.join(map(str, path)) or '<root>'}: {what}")
    lines.append(f"{pad})")
    return "\n".join(lines)
  return f"{pad}{spec.value!r}"
