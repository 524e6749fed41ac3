"""State: the nested-mapping pytree that holds a graph's Variables.

`split` returns States; their leaves are the graph's Variables themselves
(Flax NNX 0.12) or, for arrays stored directly on a Module, the raw arrays. A State
reads like nested dicts and like attributes (``state["linear"]["kernel"]`` or
``state.linear.kernel``) and flattens as a JAX pytree with dict-style keys.

>>> import jax.numpy as jnp
>>> from spmdnnx._variables import Param, BatchStat
>>> s = State({"a": {"w": Param(jnp.ones(2))}, "bn": {"mean": BatchStat(jnp.zeros(2))}})
>>> params, rest = s.split(Param, ...)
>>> [p for p, _ in params.flat_state()]
[('a', 'w')]
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Iterator, Sequence

import jax

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable


def sort_key(key: Any) -> tuple:
  """Orders mixed int/str keys: ints first numerically, then others by str."""
  return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


class FlatState(Sequence):
  """A sequence of ``(path, leaf)`` pairs, in a deterministic order."""

  __slots__ = ("_items",)

  def __init__(self, items):
    self._items = list(items)

  def __getitem__(self, i):
    return self._items[i]

  def __len__(self):
    return len(self._items)

  @property
  def paths(self) -> tuple[PathParts, ...]:
    return tuple(p for p, _ in self._items)

  @property
  def leaves(self) -> list:
    return [v for _, v in self._items]

  def to_nested_state(self) -> "State":
    return State.from_flat_path(self._items)

  def filter(self, *filters) -> "FlatState | tuple[FlatState, ...]":
    parts = split_pairs(self._items, filters, exhaustive=False)[:len(filters)]
    parts = tuple(FlatState(p) for p in parts)
    return parts[0] if len(filters) == 1 else parts

  def split(self, *filters) -> "FlatState | tuple[FlatState, ...]":
    parts = tuple(FlatState(p) for p in split_pairs(self._items, filters, exhaustive=True))
    return parts[0] if len(parts) == 1 else parts

  def __repr__(self):
    return f"FlatState({self._items!r})"


def split_pairs(pairs, filters: tuple, exhaustive: bool) -> list[list]:
  """Partitions (path, leaf) pairs by the first filter each leaf matches.

  Returns one list per filter, plus a trailing list of the unmatched pairs
  when ``exhaustive`` is False.

  Raises:
    FilterError: when exhaustive and some leaves match no filter.
  """
  if not filters:
    filters = (...,)
  predicates = filterlib.filters_to_predicates(tuple(filters))
  buckets: list[list] = [[] for _ in predicates]
  rest: list = []
  for path, leaf in pairs:
    for bucket, pred in zip(buckets, predicates):
      if pred(path, leaf):
        bucket.append((path, leaf))
        break
    else:
      rest.append((path, leaf))
  if exhaustive:
    if rest:
      listed = errors.format_paths(
          [f"{errors.path_str(p)} ({type(v).__name__})" for p, v in rest])
      raise errors.FilterError(
          "Non-exhaustive filters, got a non-empty remainder: "
          f"filters {filters!r} are not exhaustive: {len(rest)} state leaves match "
          f"none of them: {listed}. Add '...' as the last filter to collect the rest.")
    return buckets
  return buckets + [rest]


class State(MutableMapping):
  """A nested mapping from path keys to leaves (Variables or arrays)."""

  __slots__ = ("_mapping",)

  def __init__(self, mapping: Mapping | None = None, /):
    mapping = {} if mapping is None else mapping
    object.__setattr__(self, "_mapping", {
        k: State(v) if isinstance(v, Mapping) and not isinstance(v, State) else v
        for k, v in mapping.items()})

  # --- mapping protocol ------------------------------------------------------
  def __getitem__(self, key):
    return self._mapping[key]

  def __setitem__(self, key, value):
    if isinstance(value, Mapping) and not isinstance(value, State):
      value = State(value)
    self._mapping[key] = value

  def __delitem__(self, key):
    del self._mapping[key]

  def __iter__(self) -> Iterator:
    return iter(self._mapping)

  def __len__(self) -> int:
    return len(self._mapping)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    try:
      return self._mapping[name]
    except KeyError:
      raise AttributeError(
          f"State has no key {name!r}; keys are {sorted(map(str, self._mapping))}"
      ) from None

  def __setattr__(self, name, value):
    self[name] = value

  def __eq__(self, other):
    if not isinstance(other, Mapping):
      return NotImplemented
    return dict(self._mapping) == dict(other)

  __hash__ = None  # mutable

  # --- flat views ------------------------------------------------------------
  def flat_state(self) -> FlatState:
    """All leaves as ``(path, leaf)`` pairs, keys in sorted order."""
    out: list = []
    _flatten_into(self, (), out)
    return FlatState(out)

  @classmethod
  def from_flat_path(cls, pairs) -> "State":
    """Builds a nested State from ``(path, leaf)`` pairs (or a path->leaf dict).

    One pair at the empty path is the state of a graph that *is* one Variable
    (a bare Variable passed to a transform): that leaf itself is returned, as
    `split` gives it.

    >>> State.from_flat_path([(("a", "b"), 1)])["a"]["b"], State.from_flat_path([((), 2)])
    (1, 2)
    """
    items = list(pairs.items() if isinstance(pairs, Mapping) else pairs)
    if len(items) == 1 and not items[0][0]:
      return items[0][1]
    root: dict = {}
    for path, leaf in items:
      if not path:
        raise errors.GraphError("A State leaf needs a non-empty path.")
      node = root
      for key in path[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
          raise errors.GraphError(
              f"Path {errors.path_str(path)} goes through a leaf at "
              f"{key!r}; paths must not be prefixes of each other.")
        node = nxt
      if isinstance(node.get(path[-1]), dict):
        raise errors.GraphError(
            f"Path {errors.path_str(path)} is a prefix of other paths in the "
            "State; paths must not be prefixes of each other.")
      node[path[-1]] = leaf
    return cls(root)

  def filter(self, *filters) -> "State | tuple[State, ...]":
    """The leaves matching each filter (not exhaustive)."""
    if not filters:
      raise errors.FilterError("State.filter needs at least one filter.")
    parts = split_pairs(self.flat_state(), filters, exhaustive=False)[:len(filters)]
    states = tuple(State.from_flat_path(p) for p in parts)
    return states[0] if len(states) == 1 else states

  def split(self, first=..., *filters) -> "State | tuple[State, ...]":
    """Partitions the leaves by filters, which must cover every leaf."""
    parts = split_pairs(self.flat_state(), (first,) + filters, exhaustive=True)
    states = tuple(State.from_flat_path(p) for p in parts)
    return states[0] if len(states) == 1 else states

  @staticmethod
  def merge(state: "State", /, *states: "State") -> "State":
    """Combines States (later ones win on equal paths)."""
    pairs: dict = {}
    for s in (state,) + states:
      pairs.update(s.flat_state())
    return State.from_flat_path(pairs)

  def __or__(self, other: "State") -> "State":
    return State.merge(self, other)

  def to_pure_dict(self) -> dict:
    """Nested plain dicts of raw values (no Variable boxes)."""
    return {k: v.to_pure_dict() if isinstance(v, State) else _raw(v)
            for k, v in self._mapping.items()}

  def replace_by_pure_dict(self, pure: Mapping, replace_fn=None) -> None:
    """Writes raw values from nested dicts into this State's leaves, in place."""
    for key, value in pure.items():
      if key not in self._mapping:
        # Checkpoints store integer keys as strings.
        matches = [k for k in self._mapping if str(k) == str(key)]
        if not matches:
          raise errors.GraphError(
              f"replace_by_pure_dict: key {key!r} is not in this State "
              f"(keys: {sorted(map(str, self._mapping))}).")
        key = matches[0]
      current = self._mapping[key]
      if isinstance(current, State):
        current.replace_by_pure_dict(value, replace_fn)
      elif isinstance(current, Variable):
        self._mapping[key] = current.replace(
            replace_fn(current, value) if replace_fn else value)
      else:
        self._mapping[key] = replace_fn(current, value) if replace_fn else value

  def __repr__(self) -> str:
    return _repr_state(self, 0)

  # --- pytree ----------------------------------------------------------------
  def _tree_flatten_with_keys(self):
    keys = sorted(self._mapping, key=sort_key)
    return [(jax.tree_util.DictKey(k), self._mapping[k]) for k in keys], tuple(keys)

  def _tree_flatten(self):
    keys = sorted(self._mapping, key=sort_key)
    return [self._mapping[k] for k in keys], tuple(keys)

  @classmethod
  def _tree_unflatten(cls, keys, children):
    new = object.__new__(cls)
    object.__setattr__(new, "_mapping", dict(zip(keys, children)))
    return new


jax.tree_util.register_pytree_with_keys(
    State, State._tree_flatten_with_keys, State._tree_unflatten, State._tree_flatten)


def _raw(leaf):
  return leaf.raw_value if isinstance(leaf, Variable) else leaf


def _flatten_into(state: State, prefix: tuple, out: list) -> None:
  for key in sorted(state._mapping, key=sort_key):
    value = state._mapping[key]
    if isinstance(value, State):
      _flatten_into(value, prefix + (key,), out)
    else:
      out.append((prefix + (key,), value))


def _repr_state(state: State, indent: int) -> str:
  if not state._mapping:
    return "State({})"
  pad = "  " * (indent + 1)
  lines = ["State({"]
  for key in sorted(state._mapping, key=sort_key):
    value = state._mapping[key]
    text = _repr_state(value, indent + 1) if isinstance(value, State) else repr(value)
    lines.append(f"{pad}{key!r}: {text},")
  lines.append("  " * indent + "})")
  return "\n".join(lines)


class GraphState(MutableMapping):
  """A State bundled with its GraphDef (what `nnx.unpack` returns).

  Reads like its State (``gs["linear"]``, ``gs.linear``); `nnx.merge` accepts
  GraphStates alone. It is a pytree: the State's leaves are its leaves, the
  GraphDef travels in the treedef.

  >>> import spmdnnx as nnx
  >>> gs = nnx.unpack(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> gs.kernel.shape, type(nnx.merge(gs)).__name__
  ((2, 3), 'Linear')
  """

  __slots__ = ("graphdef", "state")

  _graphdef = property(lambda self: self.graphdef)  # Flax's field names
  _state = property(lambda self: self.state)

  def __init__(self, graphdef: Any, state: Any):
    if not isinstance(state, State):
      raise errors.GraphError(
          f"GraphState holds a State, got {type(state).__name__}.")
    object.__setattr__(self, "graphdef", graphdef)
    object.__setattr__(self, "state", state)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.state, name)

  def __setattr__(self, name, value):
    self.state[name] = value

  def __getitem__(self, key):
    return self.state[key]

  def __setitem__(self, key, value):
    self.state[key] = value

  def __delitem__(self, key):
    del self.state[key]

  def __iter__(self):
    return iter(self.state)

  def __len__(self):
    return len(self.state)

  def __repr__(self):
    return f"GraphState({self.state!r})"


def _graph_state_flatten_with_keys(g: GraphState):
  keyed, keys = g.state._tree_flatten_with_keys()
  return keyed, (g.graphdef, keys)


def _graph_state_unflatten(aux, children):
  graphdef, keys = aux
  return GraphState(graphdef, State._tree_unflatten(keys, children))


# Flattens like its State (same key paths); the GraphDef rides in the aux data.
jax.tree_util.register_pytree_with_keys(
    GraphState, _graph_state_flatten_with_keys, _graph_state_unflatten,
    lambda g: (lambda c, k: (c, (g.graphdef, k)))(*g.state._tree_flatten()))
