"""Graph helpers built on split/merge: unpack, map, call, recursive_map, ...

These are the Flax NNX 0.12 names around the graph core (`spmdnnx._graph`);
each accepts ``graph=`` (graph mode or tree mode; None: the mode in force).

>>> import jax.numpy as jnp, spmdnnx as nnx
>>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> zeros = nnx.map(lambda path, v: v.replace(jnp.zeros_like(v.value)), m)
>>> float(zeros.kernel.value.sum()), float(abs(m.kernel.value).sum()) > 0
(0.0, True)
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graphlib
from spmdnnx import _graph_tree as tree
from spmdnnx._graph import GraphDef, merge, split
from spmdnnx._modes import resolve_graph
from spmdnnx._object import Dict, List, Object
from spmdnnx._state import FlatState, GraphState, State
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable

class PureState(tuple):
  """A ``(GraphDef, State)`` pair, as `split` returns it (``PureState[Model]`` in hints)."""

  def __class_getitem__(cls, item):
    return tuple[GraphDef, State]


def unpack(node: Any, *filters, graph: bool | None = None) -> Any:
  """Like `split`, but each State comes bundled with the GraphDef (a `GraphState`).

  Returns:
    One GraphState for zero or one filter, else a tuple of them.

  >>> import spmdnnx as nnx
  >>> gs = nnx.unpack(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> sorted(gs)
  ['bias', 'kernel']
  """
  graphdef, *states = split(node, *filters, graph=graph)
  if len(states) == 1:
    return GraphState(graphdef, states[0])
  return tuple(GraphState(graphdef, s) for s in states)


def map(f: Callable[[PathParts, Any], Any], node: Any, /, *,  # noqa: A001 (Flax's name)
        graph: bool | None = None, recreate_variables: bool = True) -> Any:
  """A new graph whose leaves are ``f(path, leaf)`` of `node`'s leaves.

  Leaves are Variables (and raw arrays); `f` returns the new leaf (e.g.
  ``v.replace(new_value)``). `node` itself is not changed unless `f`
  mutates the Variables it is given. With ``recreate_variables=False``, a
  raw value `f` returns goes into the new graph as it is (not boxed into a
  Variable).
  """
  graphdef, state = split(node, graph=graph)
  if isinstance(state, State):
    new = State.from_flat_path([(p, f(p, v)) for p, v in state.flat_state()])
  else:
    new = f((), state)
  if not recreate_variables:
    return _merge_unboxed(graphdef, new)
  return merge(graphdef, new)


def _merge_unboxed(graphdef: GraphDef, state: Any) -> Any:
  """`merge` that puts raw leaves where Variables were, unboxed."""
  flat = dict(state.flat_state()) if isinstance(state, State) else {(): state}
  if type(graphdef.spec).__name__ == "TreeSpec":
    spec = graphdef.spec
    values = [flat[p] for p in spec.paths]
    return jax.tree_util.tree_unflatten(spec.treedef, values)
  return graphlib.Builder(lambda path, spec: flat[path]).build(graphdef.spec, ())


def call(graphdef_state: tuple, /) -> Any:
  """Calls a method on the graph a ``(graphdef, state)`` pair describes, purely.

  ``out, (graphdef, state) = nnx.call((graphdef, state)).method(*args)``;
  ``nnx.call(pair)['key'].method(...)`` reaches into a dict/list root.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> pair = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> y, pair = nnx.call(pair)(jnp.ones((1, 2)))
  >>> y.shape
  (1, 3)
  """
  graphdef, *states = graphdef_state
  return _Caller(graphdef, states, ())


class _Caller:
  """Records an attribute/item access path; calling it runs merge > method > split."""

  def __init__(self, graphdef, states, accessors):
    self._graphdef, self._states, self._accessors = graphdef, states, accessors

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Caller(self._graphdef, self._states, self._accessors + (("attr", name),))

  def __getitem__(self, key):
    return _Caller(self._graphdef, self._states, self._accessors + (("item", key),))

  def __call__(self, *args, **kwargs):
    node = merge(self._graphdef, *self._states)
    fn = node
    for kind, key in self._accessors:
      fn = getattr(fn, key) if kind == "attr" else fn[key]
    out = fn(*args, **kwargs)
    return out, split(node, graph=type(self._graphdef.spec).__name__ != "TreeSpec")


def set_metadata(node: Any, /, *, only: Any = Variable, **metadata: Any) -> None:
  """Sets metadata on every Variable of `node` matching `only`, in place.

  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> nnx.set_metadata(m, only=nnx.Param, note="frozen")
  >>> m.kernel.note
  'frozen'
  """
  found = graphlib.state(node, only, graph=True)
  leaves = found.flat_state().leaves if isinstance(found, State) else [found]
  for v in leaves:
    if isinstance(v, Variable):
      v.set_metadata(**metadata)


def recursive_map(f: Callable[[PathParts, Any], Any], node: Any, /, *,
                  graph: bool | None = None) -> Any:
  """Rebuilds a graph bottom-up: every node and leaf is replaced by ``f(path, x)``.

  Children are mapped before their parent; the parent `f` receives already
  has its mapped children. In graph mode the input is not modified (its
  structure is copied first; Variables are shared) and a node reachable
  twice is mapped once; tree mode maps a pytree.

  Raises:
    GraphError: a cycle, or (tree mode) a Variable reachable twice.

  >>> import spmdnnx as nnx
  >>> seq = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  >>> out = nnx.recursive_map(
  ...     lambda p, x: nnx.Linear(2, 4, rngs=nnx.Rngs(1))
  ...     if isinstance(x, nnx.Linear) else x, seq)
  >>> out.layers[0].out_features, seq.layers[0].out_features
  (4, 2)
  """
  if not resolve_graph(graph):
    return _recursive_map_tree(f, node)
  node = graphlib.clone(node, variables=False, graph=True)
  results: dict[int, Any] = {}
  active: set[int] = set()

  def visit(path: PathParts, x: Any) -> Any:
    key = id(x)
    if key in results:
      return results[key]
    if key in active:
      raise errors.GraphError(
          f"recursive_map: cycle at {errors.path_str(path)}: this "
          f"{type(x).__name__} contains itself; recursive_map cannot map cycles.",
          paths=[path])
    if isinstance(x, (Object, List, Dict, list, dict)):
      active.add(key)
      items = list(x.__dict__.items() if isinstance(x, Object) else
                   x.items() if isinstance(x, dict) else enumerate(x))
      for k, sub in items:
        new = visit(path + (k,), sub)
        if new is not sub:
          if isinstance(x, Object):
            setattr(x, k, new)
          else:
            x[k] = new
      active.discard(key)
    elif isinstance(x, tuple) and graphlib.has_data(x):
      x = type(x)(visit(path + (i,), v) for i, v in enumerate(x)) if type(x) is tuple \
          else x
    out = f(path, x)
    if isinstance(x, (Object, Variable, list, dict)):
      results[key] = out
    return out

  return visit((), node)


def _recursive_map_tree(f: Callable, node: Any) -> Any:
  seen: dict[int, PathParts] = {}
  active: dict[int, PathParts] = {}

  def visit(path: PathParts, x: Any) -> Any:
    if isinstance(x, Variable):
      if id(x) in seen:
        raise errors.GraphError(
            tree.duplicate_message("recursive_map", x, seen[id(x)], path),
            paths=[seen[id(x)], path])
      seen[id(x)] = path
      return f(path, x)
    tree.check_pytree_object(x, path, "recursive_map")
    keyed, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if len(keyed) == 1 and not keyed[0][0]:  # x is a leaf
      return f(path, x)
    if id(x) in active:
      raise errors.GraphError(
          tree.cycle_message("recursive_map", x, active[id(x)], path), paths=[path])
    active[id(x)] = path
    children = [visit(path + (tree.key_name(jp[0]),), sub) for jp, sub in keyed]
    del active[id(x)]
    return f(path, jax.tree_util.tree_unflatten(treedef, children))

  return visit((), node)


def find_duplicates(node: Any, /, *, only: Any = ...) -> list[list[PathParts]]:
  """The paths of every Object/Variable reachable more than once, grouped per object.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> p = nnx.Param(jnp.ones(1))
  >>> nnx.find_duplicates({"a": p, "b": p})
  [[('a',), ('b',)]]
  """
  pred = filterlib.to_predicate(only)
  paths: dict[int, list] = {}

  def visit(path: PathParts, x: Any) -> None:
    identity = isinstance(x, (Object, Variable)) or type(x) in (List, Dict)
    if identity:
      if id(x) in paths:
        if pred(path, x):
          paths[id(x)].append(path)
        return
      paths[id(x)] = [path]
    if isinstance(x, Variable):
      return
    for k, sub in _children(x):
      visit(path + (k,), sub)

  visit((), node)
  return [p for p in paths.values() if len(p) > 1]


def _children(x: Any) -> list:
  if isinstance(x, Object):
    return list(x.__dict__.items())
  if isinstance(x, dict):
    return list(x.items())
  if isinstance(x, (list, tuple)):
    return list(enumerate(x))
  if graphlib.has_data(x) and not graphlib.is_array(x):
    return graphlib._pytree_children(x)[0]
  return []


def to_flat_state(state: Any) -> FlatState:
  """The ``(path, leaf)`` pairs of a State (or nested dict), sorted by path."""
  return _state_of(state).flat_state()


def as_pure(tree: Any) -> Any:
  """The same pytree (a State stays a State) with every Variable replaced by its value.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> pure = nnx.as_pure(nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
  >>> type(pure).__name__, type(pure["bias"]).__name__
  ('State', 'ArrayImpl')
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, Variable))


def to_pure_dict(state: Any) -> dict:
  """Nested plain dicts of raw values (no Variable boxes) of a State."""
  return _state_of(state).to_pure_dict()


def _state_of(state: Any) -> State:
  if isinstance(state, GraphState):
    return state.state
  return state if isinstance(state, State) else State(state)


def from_flat_state(flat: Any) -> State:
  """A nested State from ``(path, leaf)`` pairs (a FlatState, list or dict)."""
  return State.from_flat_path(flat)


def replace_by_pure_dict(state: Any, pure: dict, replace_fn: Callable | None = None) -> None:
  """Writes the raw values of nested dicts into a State's leaves, in place.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> s = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> nnx.replace_by_pure_dict(s, {"bias": jnp.ones(3), "kernel": jnp.zeros((2, 3))})
  >>> s["bias"].value.tolist()
  [1.0, 1.0, 1.0]
  """
  _state_of(state).replace_by_pure_dict(pure, replace_fn)


def merge_state(state: Any, /, *states: Any) -> State:
  """One State from several (later ones win on equal paths)."""
  return State.merge(_state_of(state), *(_state_of(s) for s in states))


def split_state(state: Any, first: Any, /, *filters: Any) -> Any:
  """Partitions a State by filters (exhaustive: end with `...`), like `split`.

  Raises:
    FilterError: some leaf matches no filter.
  """
  return _state_of(state).split(first, *filters)


def filter_state(state: Any, first: Any, /, *filters: Any) -> Any:
  """The leaves of a State matching each filter (not exhaustive)."""
  return _state_of(state).filter(first, *filters)


def map_state(f: Callable[[PathParts, Any], Any], state: Any) -> State:
  """A new State with ``f(path, leaf)`` for each leaf."""
  return State.from_flat_path(
      [(p, f(p, v)) for p, v in _state_of(state).flat_state()])


def with_vars(node: Any, /, *, hijax: bool | None = None, ref: bool | None = None,
              mutable: bool | None = None, only: Any = ..., allow_duplicates: bool = False,
              graph: bool | None = None) -> Any:
  """A copy of `node` whose selected Variables are copies with new metadata.

  Only Variables matching `only` whose ``hijax`` / ``ref`` / ``mutable``
  differ from the values given are copied; the others stay shared with
  `node`. `node` may be a Module, a State or any graph.

  Args:
    node: the graph.
    hijax, ref, mutable: the metadata to set (None: leave as is).
    only: a filter selecting the Variables to change.
    allow_duplicates: allow a selected Variable reachable at several paths
      (each path then gets its own copy).
    graph: graph or tree mode for the traversal (None: the mode in force).

  Raises:
    GraphError: a selected Variable is reachable twice and not
      ``allow_duplicates``.
    MetadataError: ``ref=True`` (jax.Ref-backed Variables are not supported).

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  >>> m2 = nnx.with_vars(m, hijax=True)
  >>> m2.kernel.hijax, m.kernel.hijax, m2.kernel is m.kernel
  (True, False, False)
  """
  new = {k: v for k, v in (("hijax", hijax), ("ref", ref), ("mutable", mutable))
         if v is not None}
  base = filterlib.to_predicate(only)

  def selected(path: PathParts, x: Any) -> bool:
    return isinstance(x, Variable) and base(path, x) and any(
        getattr(x, k, None) != v for k, v in new.items())

  if not allow_duplicates:
    dups = find_duplicates(node, only=selected)
    if dups:
      listing = errors.format_paths(
          " and ".join(errors.path_str(p) for p in group) for group in dups)
      raise errors.GraphError(
          f"with_vars: Found duplicate at paths: {listing}: a Variable reachable "
          "at several paths would become several copies. Pass "
          "allow_duplicates=True, or narrow `only=`.",
          paths=[p for group in dups for p in group])

  def change(path: PathParts, x: Any) -> Any:
    return x.replace(**new) if selected(path, x) else x

  return map(change, node, graph=graph, recreate_variables=False)
