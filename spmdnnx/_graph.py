"""Graph traversal: split a graph of objects into a GraphDef and States, and back.

A *graph* is any structure of Objects (Modules, Rngs, ...), Variables, lists,
tuples, dicts and registered pytrees, possibly with shared references and
cycles. One walker, `Walk`, traverses it depth-first for every graph function
here and for the lifted transforms; `split` returns what it records:

- a hashable `GraphDef` (types, static attributes, Variable metadata, sharing);
- `State`s holding the graph's live Variables (and raw arrays), one State
  per filter, as Flax NNX 0.12 does.

`merge` builds new objects around the States' Variables (``copy=True`` copies
them); `update` writes a State back into live objects. A Variable reachable
by several paths appears once in the State (at its first path in attribute
name order) and comes back shared after `merge`. ``graph=False`` (tree mode,
`_graph_tree`) flattens the graph as a JAX pytree instead.

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

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import jax

from spmdnnx import errors
from spmdnnx import _graph_tree as tree
from spmdnnx._graphdef import ArraySpec, NodeSpec, PytreeSpec, RefSpec, Static, StaticSpec
from spmdnnx._graphdef import TreeSpec, VariableSpec, repr_spec
from spmdnnx._modes import resolve_graph
from spmdnnx._object import Dict, List, Object, has_data, init_object_slots, is_array
from spmdnnx._object import set_explicit
from spmdnnx._state import GraphState, State, split_pairs
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable, detach, freeze, new_variable, write_back


class GraphDef:
  """The static structure of a graph: hashable, usable as a jit static argument.

  Attributes:
    spec: the root's spec record (see `spmdnnx._graphdef`).
    outer: for a split inside an update context, ``(node index, outer node
      index)`` pairs (see `spmdnnx._graph_context`); else None.
  """

  __slots__ = ("spec", "outer", "_hash")

  def __init__(self, spec: Any, outer: tuple | None = None):
    self.spec = spec
    self.outer = outer
    self._hash = None  # computed on first use, then cached

  def __hash__(self):
    h = self._hash
    if h is None:
      h = self._hash = hash(self.spec) if self.outer is None else hash((self.spec, self.outer))
    return h

  def __eq__(self, other):
    return isinstance(other, GraphDef) and (
        self is other or (hash(self) == hash(other) and self.spec == other.spec
                          and self.outer == other.outer))

  def __repr__(self):
    return f"GraphDef(\n{repr_spec(self.spec, 1)}\n)"

  def __class_getitem__(cls, item):
    # ``GraphDef[Module]`` in annotations (Flax's GraphDef is generic).
    return cls

  @property
  def root_type(self) -> type:
    spec = self.spec
    return spec.type if isinstance(spec, (NodeSpec, VariableSpec, TreeSpec)) else type(None)

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
    # Functional: the states given to `apply` are not changed (copy=True).
    node = merge(self._graphdef, self._state, copy=True)
    fn = node
    for name in self._path:
      fn = getattr(fn, name)
    out = fn(*args, **kwargs)
    return out, split(node, graph=type(self._graphdef.spec) is not TreeSpec)


# --------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------


def is_graph_node(x: Any) -> bool:
  """Whether x is a node with identity in the graph (Object, Variable, List, Dict)."""
  return isinstance(x, (Object, Variable))


_is_array = is_array


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

  Each node with identity (Object, Variable, List/Dict) gets an index at its
  first path; later references become `RefSpec`s, which also ends cycles.
  (`index` maps ``id(node)`` to that index.) A plain list/dict is indexed
  only while it is being visited: a cycle through it is a `RefSpec`, but a
  second, separate reference is walked again (a copy after `merge`).

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
      # Attributes in name order, as Flax NNX (iteration order = State order).
      items = sorted(value.__dict__.items(), key=_by_key)
      if value._object__explicit is None and not typ._object__markers:
        children = tuple([(name, visit(sub, path + (name,))) for name, sub in items])
      else:
        children = tuple([(name, self._marked(value, name, sub, path + (name,)))
                          for name, sub in items])
      self.trail.append((path, value))
      return _new(NodeSpec, ("NodeSpec", typ, idx, children))
    if typ in _MUTABLE_CONTAINERS:
      if not has_data(value) and not _holds_itself(value):
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
      if typ is List and value._list__flags is not None:  # nnx.data/static items
        children = tuple([(k, self._list_item(v, f, path + (k,)))
                          for (k, v), f in zip(items, value._list__flags)])
      else:
        children = tuple([(k, visit(v, path + (k,))) for k, v in items])
      if typ is list or typ is dict:
        # A plain list/dict is a pytree (no identity, as in Flax NNX): a second
        # reference is a separate copy; only a cycle (met while inside) is a ref.
        del self.index[id(value)]
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

  def _marked(self, owner: Object, name: str, value: Any, path: PathParts) -> Any:
    """The spec of an attribute that may be marked `nnx.data` / `nnx.static`."""
    return self._flagged(value, owner.is_data_attribute(name), path)

  def _flagged(self, value: Any, is_data: bool | None, path: PathParts) -> Any:
    """The spec of a value marked data (True), static (False) or neither (None)."""
    if is_data is False:
      return _new(StaticSpec, ("StaticSpec", Static(value)))
    spec = self.visit(value, path)
    if is_data is None:
      return spec
    if type(spec) is StaticSpec:  # nnx.data(...) on a plain value: a State leaf
      self.has_raw = True
      self.variables.append(None)
      self.pairs.append((path, value))
      self.trail.append((path, value))
      return _new(ArraySpec, ("ArraySpec",))
    return spec

  def _list_item(self, value: Any, is_data: bool | None, path: PathParts) -> Any:
    """The spec of an `nnx.List` item: a static-marked one stays marked in the spec."""
    if is_data is False:
      return _new(StaticSpec, ("StaticSpec", Static(_StaticItem(value))))
    return self._flagged(value, is_data, path)


class _StaticItem:
  """An `nnx.List` item marked ``nnx.static`` (so `merge` marks it again)."""

  __slots__ = ("value", "_key")

  def __init__(self, value: Any):
    self.value, self._key = value, freeze(value)

  def __eq__(self, other):
    return isinstance(other, _StaticItem) and type(other.value) is type(self.value) \
        and other._key == self._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    return f"static({self.value!r})"


def _holds_itself(container: Any) -> bool:
  items = container.values() if isinstance(container, dict) else container
  return any(v is container for v in items)


def _by_key(item: tuple) -> Any:
  return item[0]


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
        if typ is List:
          _restore_list_flags(out, children)
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
        v = d[k] = self.build(sub, path + (k,))
        if type(sub) is ArraySpec and not is_array(v):
          set_explicit(obj, k, True)  # it was nnx.data(...)
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


def _restore_list_flags(out: List, children: tuple) -> None:
  """Marks again the `nnx.data` / `nnx.static` items of a rebuilt `nnx.List`."""
  flags = None
  for i, ((_, sub), v) in enumerate(zip(children, out)):
    if type(v) is _StaticItem:
      flag = False
      list.__setitem__(out, i, v.value)
    elif type(sub) is ArraySpec and not is_array(v):
      flag = True
    else:
      continue
    if flags is None:
      flags = [None] * len(out)
    flags[i] = flag
  if flags is not None:
    out._list__flags = flags


def variable_from(spec: VariableSpec, leaf: Any) -> Variable:
  """A fresh Variable for `spec` from a State leaf (a Variable) or a raw value."""
  if isinstance(leaf, Variable):
    return detach(leaf)
  return new_variable(spec.type, leaf, frozen=spec.metadata)



# --------------------------------------------------------------------------------
# Public graph functions
# --------------------------------------------------------------------------------
#
# Every function with a ``graph=`` argument walks in graph mode (`Walk`:
# sharing and cycles kept) or in tree mode (`_graph_tree`: Objects as JAX
# pytrees, a shared Variable is an error); ``None`` means the mode in force
# (`spmdnnx.set_graph_mode`). As in Flax NNX 0.12, States hold the graph's
# live Variables: ``nnx.state(model)["w"] is model.w``, and `merge` reuses the
# Variables it is given (``copy=True`` copies them; `clone` always does).


def flat_pairs(node: Any, graph: bool | None = None, who: str = "split") -> tuple:
  """``(graphdef, [(path, live leaf), ...])`` of a graph in either mode."""
  if resolve_graph(graph):
    gd, w = flatten(node, detach_variables=False)
    if type(gd.spec) is StaticSpec and not isinstance(node, (list, tuple, dict)):
      return GraphDef(_new(ArraySpec, ("ArraySpec",))), [((), node)]  # a bare leaf
    return gd, w.pairs
  spec, pairs = tree.tree_flatten(node, who)
  return GraphDef(spec), pairs


def split(node: Any, *filters, graph: bool | None = None) -> tuple:
  """Splits a graph into its GraphDef and one State per filter.

  The filters must cover every leaf (end with `...` to collect the rest). The
  States hold the graph's own Variables (not copies).

  Args:
    node: the graph (Module, list of Modules, pytree, Variable, array...).
    *filters: one State per filter; none gives one State of everything.
    graph: graph mode (True: sharing kept), tree mode (False: Objects as
      pytrees, a shared Variable is an error), None: the mode in force.

  Returns:
    ``(graphdef, state)`` without filters, else ``(graphdef, state_1, ..., state_n)``.

  Raises:
    FilterError: if the filters are not exhaustive or not filters.
    GraphError: in tree mode, a Variable reachable twice.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> gd, params = nnx.split(m, graph=False)
  >>> params["kernel"] is m.kernel
  True
  """
  graphdef, pairs = flat_pairs(node, graph, "split")
  if not filters:
    return graphdef, as_state(pairs)
  parts = split_pairs(pairs, filters, exhaustive=True)
  return (graphdef, *(as_state(p) for p in parts))


def graphdef(node: Any, *, graph: bool | None = None) -> GraphDef:
  """The GraphDef of a graph (``graph=`` as in `split`)."""
  if resolve_graph(graph):
    return flatten(node, detach_variables=False)[0]
  return GraphDef(tree.tree_flatten(node, "graphdef")[0])


def state(node: Any, *filters, graph: bool | None = None) -> State | tuple[State, ...]:
  """The State of a graph (all of it, or the leaves matching each filter).

  Leaves are the graph's live Variables: writing one changes the graph.
  """
  _, pairs = flat_pairs(node, graph, "state")
  if not filters:
    return as_state(pairs)
  parts = split_pairs(pairs, filters, exhaustive=False)[:len(filters)]
  states = tuple(as_state(p) for p in parts)
  return states[0] if len(states) == 1 else states


def variables(node: Any, *filters, graph: bool | None = None) -> State | tuple[State, ...]:
  """The live Variables of a graph as a State (Flax's `nnx.variables`; same as `state`).

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
  _, pairs = flat_pairs(node, graph, "variables")
  pairs = [(p, v) for p, v in pairs if isinstance(v, Variable)]
  if not filters:
    return as_state(pairs)
  parts = split_pairs(pairs, filters, exhaustive=False)[:len(filters)]
  states = tuple(as_state(p) for p in parts)
  return states[0] if len(states) == 1 else states


def as_state(pairs: list) -> Any:
  """A State of the pairs; a graph that *is* one Variable/array gives that leaf."""
  if len(pairs) == 1 and pairs[0][0] == ():
    return pairs[0][1]
  return State.from_flat_path(pairs)


def _collect_leaves(graphdef: GraphDef, states: tuple) -> dict:
  leaves: dict = {}
  root_leaf = isinstance(graphdef.spec, (VariableSpec, ArraySpec)) or (
      type(graphdef.spec) is TreeSpec and graphdef.spec.paths == ((),))
  for s in states:
    if isinstance(s, GraphState):
      s = s.state
    if isinstance(s, State):
      leaves.update(s.flat_state())
    elif isinstance(s, dict):
      leaves.update(State(s).flat_state())
    elif root_leaf and not isinstance(s, (list, tuple)):
      leaves[()] = s  # the graph is a single Variable (or leaf)
    else:
      raise errors.GraphError(
          f"merge expects States after the GraphDef, got {type(s).__name__}.")
  return leaves


def merge(graphdef: GraphDef | GraphState, /, *states: Any, copy: bool = False) -> Any:
  """Builds a graph from a GraphDef and States (or from `GraphState`s).

  The Variables in the States are used as they are (the new graph shares
  them with whatever else holds them, the split graph included); raw values
  (e.g. from `to_pure_dict`) are boxed into new Variables.

  Args:
    graphdef: from `split` / `graphdef`, or a `GraphState` (then every
      argument is a GraphState of the same GraphDef).
    *states: the States (all of them, if split by several filters).
    copy: copy the Variables instead of reusing them.

  Raises:
    GraphError: when the States miss paths the GraphDef needs, or hold paths
      it does not have, or the first argument is not a GraphDef.

  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> m2 = nnx.merge(*nnx.split(m))
  >>> m2 is m, m2.kernel is m.kernel
  (False, True)
  """
  if isinstance(graphdef, GraphState):
    first = graphdef
    for s in states:
      if not isinstance(s, GraphState):
        raise errors.GraphError(
            f"merge: Expected GraphState object after a GraphState, got "
            f"{type(s).__name__}; pass only the GraphStates of one nnx.unpack call.")
      if s.graphdef != first.graphdef:
        raise errors.GraphError(
            "merge: GraphDef must be the same for all GraphState objects; pass the "
            "GraphStates of one nnx.unpack call.")
    graphdef, states = first.graphdef, (first, *states)
  if not isinstance(graphdef, GraphDef):
    raise errors.GraphError(
        f"merge expects a GraphDef as first argument, got {type(graphdef).__name__}; "
        "call it as merge(graphdef, state, ...).")
  if not states:
    raise errors.ArgumentError(
        "merge() missing 1 required positional argument: 'state'; pass the State(s) "
        "from split() after the GraphDef.")
  leaves = _collect_leaves(graphdef, states)
  missing: list = []
  if type(graphdef.spec) is TreeSpec:
    node, missing = tree.tree_unflatten(graphdef.spec, leaves, copy)
  else:
    def take(path, spec):
      if path not in leaves:
        missing.append(path)
        return None
      leaf = leaves.pop(path)
      if type(spec) is not VariableSpec:
        return raw(leaf)
      if isinstance(leaf, Variable):
        return detach(leaf) if copy else leaf
      return new_variable(spec.type, leaf, frozen=spec.metadata)

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
  if isinstance(node, Variable):
    nonempty = [s for s in (state, *states) if not (isinstance(s, Mapping) and not s)]
    if len(nonempty) != 1:
      raise errors.GraphError(
          f"update: a Variable takes exactly one non-empty state, got {len(nonempty)}.")
    write_back(node, nonempty[0].state if isinstance(nonempty[0], GraphState)
               else nonempty[0])
    return
  live: dict | None = None
  for s in (state,) + states:
    if isinstance(s, GraphState):
      s = s.state
    if not isinstance(s, State):
      s = State(s)
    for path, leaf in s.flat_state():
      if live is None:
        _, w = flatten(node, detach_variables=False)
        live = {p: v for (p, _), v in zip(w.pairs, w.variables) if v is not None}
      target = live.get(path)
      if target is not None:
        if target is not leaf:
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
  _, w = flatten(node, detach_variables=False)
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


def clone(node: Any, *, variables: bool = True, arrays: bool = False,
          graph: bool | None = None) -> Any:
  """A deep copy of a graph (shared references stay shared within the copy).

  Args:
    node: the graph.
    variables: new Variables (True) or the same ones, shared with `node`.
    arrays: also copy the array buffers (needs ``variables=True``), so that
      donating one copy's buffers cannot delete the other's.
    graph: graph or tree mode, as in `split`.

  Raises:
    GraphError: ``arrays=True`` with ``variables=False``.

  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> c = nnx.clone(m, arrays=True)
  >>> c.kernel is m.kernel, c.kernel.value is m.kernel.value
  (False, False)
  """
  if arrays and not variables:
    raise errors.GraphError(
        "clone(arrays=True) copies the Variables' buffers, so it needs "
        "variables=True (the default).")
  graphdef, state_ = split(node, graph=graph)
  if arrays:
    state_ = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, state_)
    variables = False
  return merge(graphdef, state_, copy=variables)


def iter_graph(node: Any, *, graph: bool | None = None) -> Iterator[tuple[PathParts, Any]]:
  """Yields ``(path, value)`` for every node and leaf, children before parents.

  Descends into everything `split` does (registered pytrees included). Each
  shared node is yielded once, at its first path. The walk is taken before
  the first item is yielded, so the graph may be modified while iterating
  (model surgery). In tree mode (``graph=False``) the tree is walked as a
  pytree: a Variable reachable twice is an error.
  """
  if resolve_graph(graph):
    _, w = flatten(node, detach_variables=False)
    yield from w.trail
  else:
    yield from tree.iter_tree(node)


def iter_children(node: Any, *, graph: bool | None = None) -> Iterator[tuple[Any, Any]]:
  """Yields ``(key, child)`` for the direct Object children of a node.

  Children are the Objects (Modules, Rngs...) directly under `node` (an
  attribute in name order, a list item or a dict entry), each once. Tree
  mode (``graph=False``) also checks the node is a pytree.

  Raises:
    GraphError: in tree mode, a ``pytree=False`` Object or a child reachable twice.

  >>> import spmdnnx as nnx
  >>> class Pair(nnx.Module):
  ...   def __init__(self):
  ...     self.b = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  ...     self.a = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
  ...     self.n = 3
  >>> [k for k, _ in nnx.iter_children(Pair())]
  ['a', 'b']
  """
  graph = resolve_graph(graph)
  if not graph:
    tree.check_pytree_object(node, (), "iter_children")
  if isinstance(node, Object):
    items = sorted(node.__dict__.items(), key=_by_key)
  elif isinstance(node, dict):
    items = node.items()
  elif isinstance(node, (list, tuple)):
    items = enumerate(node)
  else:
    items = _pytree_children(node)[0] if has_data(node) else ()
  seen: set = set()
  for key, value in items:
    if isinstance(value, Object):
      if id(value) in seen:
        if not graph:
          raise errors.GraphError(
              f"iter_children: the {type(value).__name__} at {key!r} is reachable "
              f"twice. {tree.TREE_MODE_HINT}", paths=[(key,)])
        continue
      seen.add(id(value))
      if not graph:
        tree.check_pytree_object(value, (key,), "iter_children")
      yield key, value
