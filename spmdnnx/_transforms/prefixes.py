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
from spmdnnx._state import State
from spmdnnx._transforms.guards import PrefixMap


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
        f"nnx.prefix: no filter matches {errors.path_str(path)}; add a catch-all "
        "entry `...: value`.", paths=[path])

  return choose


def prefix(node: Any, filter_map: Mapping | Callable, /, *, graph: bool | None = None) -> Any:
  """Replaces every Variable of the graph objects in `node` by a prefix value.

  Each graph object becomes a `State` of the same paths as its state, holding
  ``filter_map(path, variable)`` (or the value of the first matching filter
  of a ``{filter: value}`` mapping). Other leaves get ``filter_map(path, leaf)``
  with their pytree path. The result is accepted wherever a transform takes a
  per-argument prefix (``in_shardings``, ``out_shardings``, axes).

  Args:
    node: a graph object or a pytree holding some.
    filter_map: ``{filter: value}`` (first match wins) or ``f(path, leaf)``.
    graph: accepted for Flax compatibility; the result is the same in both
      modes (each object is described by its own paths).

  Raises:
    TransformError: a Variable matches no filter of the mapping.
  """
  del graph
  choose = _chooser(filter_map)

  def one(path, leaf):
    if graphlib.is_graph_node(leaf):
      _, w = graphlib.flatten(leaf)
      return State.from_flat_path([(p, choose(p, v)) for p, v in w.pairs])
    return choose(tuple(_key(k) for k in path), leaf)

  return jax.tree_util.tree_map_with_path(one, node, is_leaf=graphlib.is_graph_node)


def _key(k: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def leaf_value(prefix_value: Any, path: tuple, leaf: Any, who: str) -> Any:
  """The prefix value of one state leaf at `path` (relative to its node)."""
  if isinstance(prefix_value, StateSharding):
    return prefix_value.spec_for(path, leaf, who)
  if isinstance(prefix_value, State):
    flat = _flat(prefix_value)
    return flat.get(tuple(path))
  return prefix_value


def _flat(state: State) -> dict:
  return {tuple(p): v for p, v in state.flat_state()}


def has_state_prefix(tree: Any) -> bool:
  """Whether a prefix tree holds a `State` prefix or a `StateSharding`."""
  return any(isinstance(x, (State, StateSharding)) for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, (State, StateSharding))))
