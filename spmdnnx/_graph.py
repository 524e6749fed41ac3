"""Graph traversal: split a graph of objects into a GraphDef and States, and back.

A *graph* is any structure of Objects (Modules, Rngs, ...), Variables, lists,
tuples, dicts and registered pytrees, possibly with shared references and
cycles. One walker, `Walk`, traverses it depth-first for every graph function
here and for the lifted transforms; `split` returns what it records:

- a hashable `GraphDef` (types, static attributes, Variable metadata, sharing);
- `State`s holding detached copies of the Variables (and raw arrays), one
  State per filter.

`merge` rebuilds fresh objects from a GraphDef and States; `update` writes a
State back into live objects. A Variable reachable by several paths appears
once in the State (at its first path) and comes back shared after `merge`.

>>> import jax.numpy as jnp
>>> from spmdnnx._variables import Param
>>> from spmdnnx._object import Object
>>> class Pair(Object):
...   def __init__(self):
...     self.a = Param(jnp.ones(2))
...     self.b = self.a  # shared
>>> graphdef, state = split(Pair())
>>> [p for p, _ in state.flat_state()]
[('a',)]
>>> copy = merge(graphdef, state)
>>> copy.a is copy.b
True
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np

from spmdnnx import errors
from spmdnnx._graphdef import ArraySpec, NodeSpec, PytreeSpec, RefSpec, Static, StaticSpec
from spmdnnx._graphdef import VariableSpec, repr_spec
from spmdnnx._object import Dict, List, Object, init_object_slots
from spmdnnx._state import State, split_pairs
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable, detach, new_variable, write_back


class GraphDef:
  """The static structure of a graph: hashable, usable as a jit static argument.

  Attributes:
    spec: the root's spec record (see `spmdnnx._graphdef`).
  """

  __slots__ = ("spec", "_hash")

  def __init__(self, spec: Any):
    self.spec = spec
    self._hash = None  # computed on first use, then cached

  def __hash__(self):
    h = self._hash
    if h is None:
      h = self._hash = hash(self.spec)
    return h

  def __eq__(self, other):
    return isinstance(other, GraphDef) and (
        self is other or (hash(self) == hash(other) and self.spec == other.spec))

  def __repr__(self):
    return f"GraphDef(\n{repr_spec(self.spec, 1)}\n)"

  @property
  def root_type(self) -> type:
    spec = self.spec
    return spec.type if isinstance(spec, (NodeSpec, VariableSpec)) else type(None)

  def apply(self, state: State, *states: State) -> "_ApplyCaller":
    """Functional call: ``(out, (graphdef, state)) = gd.apply(state)(*args)``."""
    return _ApplyCaller(self, State.merge(state, *states))


# A GraphDef is a pytree with no leaves, so it can be passed to jax.jit (and
# other JAX transforms) as an ordinary argument: it travels in the treedef.
jax.tree_util.register_pytree_node(
    GraphDef, lambda g: ((), g), lambda g, _: g)


class _ApplyCaller:

  def __init__(self, graphdef: GraphDef, state: State, path: tuple = ()):
    self._graphdef, self._state, self._path = graphdef, state, path

  def __getattr__(self, name):
    return _ApplyCaller(self._graphdef, self._state, self._path + (name,))

  def __call__(self, *args, **kwargs):
    node = merge(self._graphdef, self._state)
    fn = node
    for name in self._path:
      fn = getattr(fn, name)
    out = fn(*args, **kwargs)
    return out, split(node)


# --------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------


def is_graph_node(x: Any) -> bool:
  """Whether x is a node with identity in the graph (Object, Variable, List, Dict)."""
  return isinstance(x, (Object, Variable))


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or \
      isinstance(x, jax.core.Tracer)


def _stop_at_nodes(x: Any) -> bool:
  return isinstance(x, (Object, Variable)) or _is_array(x)


def has_data(value: Any) -> bool:
  """Whether value holds anything that belongs in a State."""
  if isinstance(value, (Object, Variable)) or _is_array(value):
    return True
  if isinstance(value, (str, bytes, int, float, bool, complex, type(None), type)):
    return False
  if isinstance(value, (list, tuple)):
    return any(has_data(v) for v in value)
  if isinstance(value, dict):
    return any(has_data(v) for v in value.values())
  if callable(value) and not hasattr(value, "__dict__"):
    return False
  try:
    leaves = jax.tree.leaves(value, is_leaf=_stop_at_nodes)
  except Exception:  # noqa: BLE001  (unknown objects are static)
    return False
  return len(leaves) != 1 or leaves[0] is not value and has_data(leaves[0])


def _pytree_children(value: Any) -> tuple[list, Any]:
  """One level of a registered pytree: ``([(key, child), ...], treedef)``."""
  keyed, treedef = jax.tree_util.tree_flatten_with_path(
      value, is_leaf=lambda x: x is not value)
  return [(_key_name(keypath[-1]), child) for keypath, child in keyed], treedef


def _key_name(k) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


# --------------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------------


class Walk:
  """One depth-first walk of a graph: THE traversal every graph function uses.

  `split`, `state`, `graphdef`, `pop`, `update`, `iter_graph` (and through it
  `reseed`, `split_rngs`, `iter_modules`) and the lifted transforms (argument
  flattening and output marking) all read a `Walk`, so they agree on what a
  graph contains: Objects, Variables, lists/dicts/tuples, arrays and
  registered pytrees (dataclasses, namedtuples) holding any of those.

  Each node with identity (Object, Variable, list/dict) gets an index at its
  first path; later references become `RefSpec`s, which also ends cycles.
  (`index` maps ``id(node)`` to that index.)

  Attributes:
    pairs: ``(path, state leaf)`` per Variable / raw array, DFS order (leaves
      are detached Variable copies when ``detach``, else the live Variables).
    variables: the live Variable per pair (None for a raw array).
    nodes: every node with identity, by index.
    trail: ``(path, value)`` per node and leaf that holds data, children
      before parents, each shared node once (what `iter_graph` yields).
    has_raw: whether some leaf is a raw array (not in a Variable).
    static_containers: tracked List/Dict values that hold no data now (jit
      watches them: they may get data later).
  """

  __slots__ = ("index", "pairs", "variables", "nodes", "trail", "has_raw", "detach",
               "static_containers")

  def __init__(self, detach: bool = True):
    self.index: dict[int, int] = {}
    self.pairs: list = []
    self.variables: list = []
    self.nodes: list = []
    self.trail: list = []
    self.has_raw = False
    self.detach = detach
    self.static_containers: list = []

  def visit(self, value: Any, path: PathParts) -> Any:
    """The spec of `value` at `path`, recording what it holds."""
    typ = type(value)
    if typ in _SCALARS:
      return _new(StaticSpec, ("StaticSpec", Static(value)))
    if isinstance(value, Variable):
      idx = self.index.get(id(value))
      if idx is not None:
        return _new(RefSpec, ("RefSpec", idx))
      idx = self.index[id(value)] = len(self.nodes)
      self.nodes.append(value)
      self.variables.append(value)
      self.pairs.append((path, detach(value) if self.detach else value))
      self.trail.append((path, value))
      return _new(VariableSpec, ("VariableSpec", typ, idx, value.frozen_metadata()))
    if isinstance(value, Object):
      idx = self.index.get(id(value))
      if idx is not None:
        return _new(RefSpec, ("RefSpec", idx))
      idx = self.index[id(value)] = len(self.nodes)
      self.nodes.append(value)
      visit = self.visit
      children = tuple([(name, visit(sub, path + (name,)))
                        for name, sub in value.__dict__.items()])
      self.trail.append((path, value))
      return _new(NodeSpec, ("NodeSpec", typ, idx, children))
    if typ in _MUTABLE_CONTAINERS:
      if not has_data(value):
        if typ in (List, Dict):
          self.static_containers.append(value)
        return _new(StaticSpec, ("StaticSpec", Static(value)))
      idx = self.index.get(id(value))
      if idx is not None:
        return _new(RefSpec, ("RefSpec", idx))
      idx = self.index[id(value)] = len(self.nodes)
      self.nodes.append(value)
      items = value.items() if typ in (dict, Dict) else enumerate(value)
      visit = self.visit
      children = tuple([(k, visit(v, path + (k,))) for k, v in items])
      self.trail.append((path, value))
      return _new(NodeSpec, ("NodeSpec", typ, idx, children))
    if typ is tuple:
      if not has_data(value):
        return _new(StaticSpec, ("StaticSpec", Static(value)))
      visit = self.visit
      children = tuple([(i, visit(v, path + (i,))) for i, v in enumerate(value)])
      self.trail.append((path, value))
      return _new(NodeSpec, ("NodeSpec", tuple, None, children))
    if _is_array(value):
      self.has_raw = True
      self.variables.append(None)
      self.pairs.append((path, value))
      self.trail.append((path, value))
      return _new(ArraySpec, ("ArraySpec",))
    if has_data(value):
      keyed, treedef = _pytree_children(value)
      keys = tuple(k for k, _ in keyed)
      children = tuple(self.visit(v, path + (k,)) for k, v in keyed)
      self.trail.append((path, value))
      return _new(PytreeSpec, ("PytreeSpec", treedef, keys, children))
    return _new(StaticSpec, ("StaticSpec", Static(value)))


# Spec records are built with tuple.__new__ directly in the walker (the hot
# loop); the tuple layout is the records' ``(kind, *fields)``.
_new = tuple.__new__
_SCALARS = frozenset({str, int, float, bool, complex, bytes, type(None)})
_MUTABLE_CONTAINERS = frozenset({list, List, dict, Dict})


def flatten(node: Any, *, detach_variables: bool = True) -> tuple[GraphDef, Walk]:
  """Walks a graph once; returns its GraphDef and the `Walk`'s records."""
  w = Walk(detach_variables)
  spec = w.visit(node, ())
  return GraphDef(spec), w


# --------------------------------------------------------------------------------
# Unflatten
# --------------------------------------------------------------------------------


class Builder:
  """Rebuilds objects from a spec, taking leaves from ``take(path, spec)``.

  ``take`` is called for every `VariableSpec` and `ArraySpec`, in DFS order,
  and returns the Variable / value to put there.
  """

  __slots__ = ("take", "nodes")

  def __init__(self, take: Callable):
    self.take = take
    self.nodes: dict[int, Any] = {}

  def build(self, spec: Any, path: PathParts) -> Any:
    kind = type(spec)
    if kind is VariableSpec:
      var = self.take(path, spec)
      self.nodes[spec.index] = var
      return var
    if kind is NodeSpec:
      _, typ, idx, children = spec
      if typ is tuple:
        return tuple(self.build(sub, path + (k,)) for k, sub in children)
      if typ in (list, List):
        out = typ()
        self.nodes[idx] = out
        list.extend(out, (self.build(sub, path + (k,)) for k, sub in children))
        return out
      if typ in (dict, Dict):
        out = typ()
        self.nodes[idx] = out
        for k, sub in children:
          dict.__setitem__(out, k, self.build(sub, path + (k,)))
        return out
      obj = object.__new__(typ)
      init_object_slots(obj)
      self.nodes[idx] = obj
      d = obj.__dict__
      for k, sub in children:
        d[k] = self.build(sub, path + (k,))
      return obj
    if kind is RefSpec:
      return self.nodes[spec.index]
    if kind is ArraySpec:
      return self.take(path, spec)
    if kind is StaticSpec:
      return spec.value.value
    if kind is PytreeSpec:
      children = [self.build(sub, path + (k,)) for k, sub in zip(spec.keys, spec.children)]
      return jax.tree_util.tree_unflatten(spec.treedef, children)
    raise errors.GraphError(
        f"Corrupt GraphDef spec at {errors.path_str(path)}: {spec!r}; build "
        "GraphDefs with split()/graphdef(), not by hand.", paths=[path])


def variable_from(spec: VariableSpec, leaf: Any) -> Variable:
  """A fresh Variable for `spec` from a State leaf (a Variable) or a raw value."""
  if isinstance(leaf, Variable):
    return detach(leaf)
  return new_variable(spec.type, leaf, frozen=spec.metadata)


# --------------------------------------------------------------------------------
# Public graph functions
# --------------------------------------------------------------------------------


def split(node: Any, *filters) -> tuple:
  """Splits a graph into its GraphDef and one State per filter.

  The filters must cover every leaf (end with `...` to collect the rest).

  Returns:
    ``(graphdef, state)`` without filters, else ``(graphdef, state_1, ..., state_n)``.

  Raises:
    FilterError: if the filters are not exhaustive or not filters.
  """
  graphdef, f = flatten(node)
  if not filters:
    return graphdef, _as_state(f.pairs)
  parts = split_pairs(f.pairs, filters, exhaustive=True)
  return (graphdef, *(_as_state(p) for p in parts))


def graphdef(node: Any) -> GraphDef:
  """The GraphDef of a graph."""
  return flatten(node, detach_variables=False)[0]


def state(node: Any, *filters) -> State | tuple[State, ...]:
  """The State of a graph (all of it, or the leaves matching each filter)."""
  _, f = flatten(node)
  if not filters:
    return _as_state(f.pairs)
  parts = split_pairs(f.pairs, filters, exhaustive=False)[:len(filters)]
  states = tuple(_as_state(p) for p in parts)
  return states[0] if len(states) == 1 else states


def _as_state(pairs: list) -> Any:
  """A State of the pairs; a graph that *is* one Variable/array gives that leaf."""
  if len(pairs) == 1 and pairs[0][0] == ():
    return pairs[0][1]
  return State.from_flat_path(pairs)


def merge(graphdef: GraphDef, state: State | None = None, /, *states: State) -> Any:
  """Builds a fresh graph from a GraphDef and States.

  Raises:
    GraphError: when the States miss paths the GraphDef needs, or hold paths
      it does not have.
  """
  if not isinstance(graphdef, GraphDef):
    raise errors.GraphError(
        f"merge expects a GraphDef as first argument, got {type(graphdef).__name__}; "
        "call it as merge(graphdef, state, ...).")
  leaves: dict = {}
  for s in ((state,) if state is not None else ()) + states:
    if isinstance(s, State):
      leaves.update(s.flat_state())
    elif isinstance(s, dict):
      leaves.update(State(s).flat_state())
    elif isinstance(graphdef.spec, (VariableSpec, ArraySpec)) and (
        isinstance(s, Variable) or _is_array(s)):
      leaves[()] = s  # the graph is a single Variable (or array)
    else:
      raise errors.GraphError(
          f"merge expects States after the GraphDef, got {type(s).__name__}.")
  missing: list = []

  def take(path, spec):
    if path not in leaves:
      missing.append(path)
      return None
    leaf = leaves.pop(path)
    return variable_from(spec, leaf) if type(spec) is VariableSpec else raw(leaf)

  node = Builder(take).build(graphdef.spec, ())
  if missing or leaves:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} path(s) the GraphDef needs: "
                   f"{errors.format_paths(map(errors.path_str, missing))}")
    if leaves:
      parts.append(f"{len(leaves)} path(s) the GraphDef does not have: "
                   f"{errors.format_paths(map(errors.path_str, leaves))}")
    raise errors.GraphError(
        "merge: the State does not match the GraphDef: " + "; ".join(parts) +
        ". Pass the State(s) produced by split() of the same graph (all of them, "
        "if you split by several filters).", paths=missing + list(leaves))
  return node


def raw(leaf: Any) -> Any:
  """The value of a State leaf (a Variable's value, or the array itself)."""
  return leaf.raw_value if isinstance(leaf, Variable) else leaf


def update(node: Any, state: State, /, *states: State) -> None:
  """Writes States into a live graph, in place (new paths create Variables).

  Raises:
    GraphError: a path that goes through a node the graph lacks, or into an
      immutable container (tuple, pytree).
  """
  live: dict | None = None
  for s in (state,) + states:
    if not isinstance(s, State):
      s = State(s)
    for path, leaf in s.flat_state():
      if live is None:
        _, w = flatten(node, detach_variables=False)
        live = {p: v for (p, _), v in zip(w.pairs, w.variables) if v is not None}
      target = live.get(path)
      if target is not None:
        write_back(target, leaf)
      else:
        _set_path(node, path, leaf)


_MISSING = object()


def child(obj: Any, key: Any) -> Any:
  """The child of a graph position under `key` (as the walker names it), or _MISSING."""
  if isinstance(obj, Object):
    return obj.__dict__.get(key, _MISSING)
  if isinstance(obj, dict):
    return obj.get(key, _MISSING)
  if type(obj) in (list, List, tuple):
    return obj[key] if isinstance(key, int) and 0 <= key < len(obj) else _MISSING
  if isinstance(obj, Variable) or _is_array(obj) or not has_data(obj):
    return _MISSING
  for k, sub in _pytree_children(obj)[0]:
    if k == key:
      return sub
  return _MISSING


def _set_path(root: Any, path: PathParts, leaf: Any) -> None:
  parent = root
  for i, key in enumerate(path[:-1]):
    parent = child(parent, key)
    if parent is _MISSING:
      raise errors.GraphError(
          f"update: path {errors.path_str(path)} does not exist in the graph "
          f"(no {errors.path_str(path[:i + 1])}); update can add Variables to "
          "existing nodes but not create nodes.", paths=[path])
  key = path[-1]
  target = child(parent, key)
  if isinstance(target, Variable):
    write_back(target, leaf)
    return
  new = detach(leaf) if isinstance(leaf, Variable) else leaf
  if isinstance(parent, Object):
    setattr(parent, key, new)
  elif isinstance(parent, (dict, list)):
    parent[key] = new
  else:
    raise errors.GraphError(
        f"update: cannot set {errors.path_str(path)} inside a "
        f"{type(parent).__name__} (immutable); rebuild it with merge instead.",
        paths=[path])


def pop(node: Any, *filters) -> State | tuple[State, ...]:
  """Removes the Variables matching each filter from the graph; returns them.

  Raises:
    FilterError: no filter given.
    GraphError: a matching Variable inside an immutable container.
  """
  if not filters:
    raise errors.FilterError("pop needs at least one filter, e.g. pop(model, nnx.Intermediate).")
  _, w = flatten(node)
  parts = split_pairs(w.pairs, filters, exhaustive=False)[:len(filters)]
  for part in parts:
    for path, _ in part:
      parent = node
      for key in path[:-1]:
        parent = child(parent, key)
      if isinstance(parent, Object):
        delattr(parent, path[-1])
      elif isinstance(parent, (dict, list)):
        del parent[path[-1]]
      else:
        raise errors.GraphError(
            f"pop: cannot remove {errors.path_str(path)} from an immutable "
            f"{type(parent).__name__}.", paths=[path])
  states = tuple(State.from_flat_path(p) for p in parts)
  return states[0] if len(states) == 1 else states


def variables(node: Any, *filters) -> State | tuple[State, ...]:
  """The live Variables of a graph as a State (not copies), like Flax's `nnx.variables`.

  Mutating a returned Variable (``v.value = ...``) changes the graph. With
  filters, one State per filter (not exhaustive), as `state` does.

  >>> import jax.numpy as jnp
  >>> from spmdnnx._variables import Param
  >>> from spmdnnx._object import Object
  >>> class M(Object):
  ...   def __init__(self):
  ...     self.w = Param(jnp.zeros(2))
  >>> m = M()
  >>> variables(m, Param)["w"].value = jnp.ones(2)
  >>> m.w.value.tolist()
  [1.0, 1.0]
  """
  _, w = flatten(node, detach_variables=False)
  pairs = [(p, v) for p, v in w.pairs if isinstance(v, Variable)]
  if not filters:
    return _as_state(pairs)
  parts = split_pairs(pairs, filters, exhaustive=False)[:len(filters)]
  states = tuple(_as_state(p) for p in parts)
  return states[0] if len(states) == 1 else states


def clone(node: Any) -> Any:
  """A deep copy of a graph (shared references stay shared within the copy)."""
  return merge(*split(node))


def iter_graph(node: Any) -> Iterator[tuple[PathParts, Any]]:
  """Yields ``(path, value)`` for every node and leaf, children before parents.

  Descends into everything `split` does (registered pytrees included). Each
  shared node is yielded once, at its first path. The walk is taken before
  the first item is yielded, so the graph may be modified while iterating
  (model surgery).
  """
  _, w = flatten(node, detach_variables=False)
  yield from w.trail


def iter_children(node: Object) -> Iterator[tuple[Any, Object]]:
  """Yields ``(name, child)`` for the direct Object children of a node."""
  for name, value in node.__dict__.items():
    if isinstance(value, Object):
      yield name, value
