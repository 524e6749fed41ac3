"""Per-Variable prefixes for transform arguments (shardings, axes).

A transform argument that is a graph object takes one prefix value for all
of its state (a sharding, an axis, None), a filter map (`StateSharding`) or
the `State` that `prefix` builds: the node's state with every Variable
replaced by its prefix value. `leaf_value` reads the value for one state leaf
from any of these.

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> p = nnx.prefix(m, {nnx.PathContains("kernel"): 0, ...: None})
>>> p["kernel"], p["bias"]
(0, None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graphlib
from spmdnnx import _modes as modeslib
from spmdnnx._state import State
from spmdnnx._transforms.guards import PrefixMap
from spmdnnx._variables import Variable


@dataclasses.dataclass(frozen=True)
class _PathIs:
  """Matches exactly one path (the filters of a StateSharding built from a State)."""
  path: tuple

  def __call__(self, path, value):
    return tuple(path) == self.path


class StateSharding(PrefixMap):
  """Per-filter shardings (or PartitionSpecs) for the state of one graph argument.

  Filters are tried in order; the first that matches a Variable gives its
  value. Used by `jit` (``in_shardings``) and `shard_map` (``in_specs``).

  >>> import spmdnnx as nnx
  >>> from jax.sharding import PartitionSpec as P
  >>> s = nnx.StateSharding({nnx.PathContains("kernel"): P("a"), ...: P()})
  >>> s.shardings
  (P('a',), P())
  """

  def __init__(self, filter_sharding: Mapping | Any, /):
    if isinstance(filter_sharding, State):  # one exact-path filter per entry
      filter_sharding = [(_PathIs(tuple(p)), s) for p, s in filter_sharding.flat_state()]
    items = tuple(filter_sharding.items() if isinstance(filter_sharding, Mapping)
                  else filter_sharding)
    self.filters = tuple(f for f, _ in items)
    self.shardings = tuple(s for _, s in items)
    self.predicates = filterlib.filters_to_predicates(self.filters)

  @property
  def specs(self) -> tuple:
    """The values in filter order (same as `shardings`)."""
    return self.shardings

  def spec_for(self, path: tuple, leaf: Any, who: str = "shard_map") -> Any:
    """The value of the first filter matching ``(path, leaf)``.

    Raises:
      TransformError: no filter matches.
    """
    for pred, spec in zip(self.predicates, self.shardings):
      if pred(path, leaf):
        return spec
    raise errors.TransformError(
        f"{who}: StateSharding filters do not match {errors.path_str(path)}; "
        "add a catch-all entry such as `...: PartitionSpec()`.", paths=[path])

  def __repr__(self):
    inner = ", ".join(f"{f!r}: {s!r}" for f, s in zip(self.filters, self.shardings))
    return f"StateSharding({{{inner}}})"

  def __eq__(self, other):
    return (isinstance(other, StateSharding) and self.filters == other.filters
            and self.shardings == other.shardings)

  def __hash__(self):
    return hash((StateSharding, self.filters, self.shardings))


class TreeState(State):
  """The prefix of one graph object built by ``prefix(..., graph=True)``.

  A `State` with the object's state paths holding prefix values (so it is
  accepted wherever a State prefix is), plus the prefix function that built
  it: a transform asks that function for the prefix of every Variable of the
  object, including Variables an earlier argument already holds (whose paths
  are left out of this State, as in a joint split), so aliased Variables are
  checked for consistent prefixes.

  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> p = nnx.prefix(m, {nnx.Param: 0}, graph=True)
  >>> isinstance(p, nnx.extract.TreeState), p.state["kernel"]
  (True, 0)
  """

  __slots__ = ("graphdef", "prefix_fn")

  def __init__(self, graphdef: Any = None, state: Any = None,
               prefix_fn: Callable | None = None):
    super().__init__(state)
    object.__setattr__(self, "graphdef", graphdef)
    object.__setattr__(self, "prefix_fn", prefix_fn)

  @property
  def state(self) -> State:
    """The prefix values as a plain nested `State` (Flax's ``TreeState.state``)."""
    return State(self)

  def value_for(self, path: tuple, leaf: Any) -> Any:
    """The prefix of the state leaf at `path` (relative to the object)."""
    if self.prefix_fn is not None:
      return self.prefix_fn(tuple(path), leaf)
    return _flat(self).get(tuple(path), _MISSING)

  def __repr__(self):
    return f"TreeState({dict(self)!r})"


_MISSING = object()


def _chooser(filter_map: Mapping | Callable) -> Callable:
  if callable(filter_map) and not isinstance(filter_map, Mapping):
    return filter_map
  filters = tuple(filter_map)
  values = tuple(filter_map.values())
  preds = filterlib.filters_to_predicates(filters)

  def choose(path, leaf):
    for pred, value in zip(preds, values):
      if pred(path, leaf):
        return value
    raise errors.TransformError(
        f"nnx.prefix: No filter matched leaf at path {errors.path_str(path)} "
        f"({type(leaf).__name__}); filters: {list(filters)!r}. Add a catch-all entry "
        "`...: value`.", paths=[path])

  return choose


def _is_node_or_var(x: Any) -> bool:
  return graphlib.is_graph_node(x) or isinstance(x, Variable)


def prefix(node: Any, filter_map: Mapping | Callable, /, *, graph: bool | None = None) -> Any:
  """Replaces every Variable of the graph objects in `node` by a prefix value.

  The value is ``filter_map(path, variable)``, or the value of the first
  matching filter of a ``{filter: value}`` mapping. The result is accepted
  wherever a transform takes a per-argument prefix (``in_axes``/``out_axes``,
  ``in_shardings``/``out_shardings``, ``in_specs``):

  - ``graph=True`` (graph mode, the default setting): each graph object
    becomes a `TreeState` of its state paths. Objects are split jointly, in
    order: an object or Variable seen earlier in `node` is left out of later
    ones, so pass all the transform's objects in one call, in argument order.
  - ``graph=False`` (tree mode): each object becomes a `State` of its own
    paths (attribute access reads it like the object: ``p.linear.kernel``).
    Transforms also accept a pytree of the object's own shape (e.g. the
    object with each Variable replaced by its value).

  Other leaves get ``filter_map(path, leaf)`` with their pytree path; a bare
  Variable gets its value directly.

  Args:
    node: a graph object, a Variable or a pytree holding some.
    filter_map: ``{filter: value}`` (first match wins) or ``f(path, leaf)``.
    graph: graph or tree mode (None: the setting in force).

  Raises:
    TransformError: (a ValueError) a Variable matches no filter of the mapping.

  >>> import jax, jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> p = nnx.prefix(m, {nnx.PathContains("kernel"): 0, ...: None}, graph=False)
  >>> p.kernel, p.bias
  (0, None)
  """
  graph = modeslib.resolve_graph(graph)
  choose = _chooser(filter_map)
  if not graph:

    def one(keypath, leaf):
      if graphlib.is_graph_node(leaf):
        _, w = graphlib.flatten(leaf)
        return State.from_flat_path([(p, choose(p, v)) for p, v in w.pairs])
      return choose(tuple(_key(k) for k in keypath), leaf)

    return jax.tree_util.tree_map_with_path(one, node, is_leaf=graphlib.is_graph_node)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_node_or_var)
  unique: list = []
  seen: dict = {}
  for _, leaf in leaves:
    if graphlib.is_graph_node(leaf) and not isinstance(leaf, Variable) \
        and id(leaf) not in seen:
      seen[id(leaf)] = len(unique)
      unique.append(leaf)
  graphdef, w = graphlib.flatten(tuple(unique))
  pairs: dict = {}
  for p, v in w.pairs:
    pairs.setdefault(p[0], []).append((p[1:], v))
  out = []
  given: set = set()
  for keypath, leaf in leaves:
    path = tuple(_key(k) for k in keypath)
    if isinstance(leaf, Variable):
      out.append(choose(path, leaf))
    elif graphlib.is_graph_node(leaf):
      i = seen[id(leaf)]
      own = [] if i in given else pairs.get(i, [])
      given.add(i)
      out.append(TreeState(graphlib.graphdef(leaf), State.from_flat_path(
          [(p, choose(p, v)) for p, v in own]), choose))
    else:
      out.append(choose(path, leaf))
  return jax.tree_util.tree_unflatten(treedef, out)


def _key(k: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def leaf_value(prefix_value: Any, path: tuple, leaf: Any, who: str) -> Any:
  """The prefix value of one state leaf at `path` (relative to its node)."""
  if isinstance(prefix_value, StateSharding):
    return prefix_value.spec_for(path, leaf, who)
  if isinstance(prefix_value, TreeState) and prefix_value.prefix_fn is not None:
    return prefix_value.prefix_fn(tuple(path), leaf)
  if isinstance(prefix_value, State):
    flat = _flat(prefix_value)
    return flat.get(tuple(path))
  return prefix_value


def equivalent(a: Any, b: Any, pairs: list, who: str) -> bool:
  """Whether two prefixes give every state leaf of one object the same value.

  Args:
    pairs: the object's ``(path, leaf)`` state pairs (paths relative to it).

  >>> equivalent(0, StateSharding({...: 0}), [(("w",), None)], "jit")
  True
  """
  try:
    return all(leaf_value(a, p, x, who) == leaf_value(b, p, x, who) for p, x in pairs)
  except errors.TransformError:
    return False


def _flat(state: State) -> dict:
  return {tuple(p): v for p, v in state.flat_state()}


def has_state_prefix(tree: Any) -> bool:
  """Whether a prefix tree holds a `State` prefix or a `StateSharding`."""
  return any(isinstance(x, (State, StateSharding)) for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, (State, StateSharding))))
