"""Graph traversal: split a graph of objects into a GraphDef and States, and back.

A *graph* is any structure of Objects (Modules, Rngs, ...), Variables, lists,
tuples, dicts and registered pytrees, possibly with shared references and
cycles. `split` walks it depth-first and returns:

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
from spmdnnx import _tracectx as tracectx
from spmdnnx._object import Dict, List, Object, init_object_slots
from spmdnnx._state import State, split_pairs
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable, freeze

# Spec tags (first element of each spec tuple in a GraphDef).
NODE, REF, VAR, LEAF, STATIC, PYTREE = "node", "ref", "var", "leaf", "static", "pytree"

_CONTAINERS = (list, List, dict, Dict, tuple)


class _Static:
  """Hashable wrapper around a static attribute value."""

  __slots__ = ("value", "_key")

  def __init__(self, value):
    self.value = value
    self._key = freeze(value)

  def __eq__(self, other):
    return isinstance(other, _Static) and type(other.value) is type(self.value) \
        and other._key == self._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    return repr(self.value)


class GraphDef:
  """The static structure of a graph: hashable, usable as a jit static argument."""

  __slots__ = ("spec", "_hash")

  def __init__(self, spec: tuple):
    self.spec = spec
    self._hash = hash(spec)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, GraphDef) and (
        self is other or (self._hash == other._hash and self.spec == other.spec))

  def __repr__(self):
    return f"GraphDef(\n{_repr_spec(self.spec, 1)}\n)"

  @property
  def root_type(self) -> type:
    return self.spec[1] if self.spec[0] in (NODE, VAR) else type(None)

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


def _repr_spec(spec: tuple, depth: int) -> str:
  pad = "  " * depth
  tag = spec[0]
  if tag == NODE:
    _, typ, _, attrs, _ = spec
    lines = [f"{pad}{typ.__name__}("]
    for key, sub in attrs:
      lines.append(f"{pad}  {key!r}:")
      lines.append(_repr_spec(sub, depth + 2))
    lines.append(f"{pad})")
    return "\n".join(lines)
  if tag == VAR:
    meta = ", ".join(f"{k}={v!r}" for k, v in spec[3])
    return f"{pad}{spec[1].__name__}({meta})"
  if tag == REF:
    return f"{pad}<shared #{spec[1]}>"
  if tag == LEAF:
    return f"{pad}<array>"
  if tag == PYTREE:
    return f"{pad}pytree {spec[1]}"
  return f"{pad}{spec[1]!r}"


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


def _dict_keys(d: dict) -> list:
  return list(d.keys())


# --------------------------------------------------------------------------------
# Flatten
# --------------------------------------------------------------------------------


class _Flattener:
  """One depth-first walk, assigning indices to shared nodes."""

  __slots__ = ("index", "pairs", "variables", "nodes", "has_raw", "detach", "static_containers")

  def __init__(self, detach: bool = True):
    self.index: dict[int, int] = {}
    self.pairs: list = []          # (path, state leaf)
    self.variables: list = []      # live Variables (or None for raw arrays), DFS order
    self.nodes: list = []          # every node with identity, DFS order
    self.has_raw = False
    self.detach = detach
    # Tracked List/Dict values that are static now (hold no data) but may get
    # data later (`self.layers = []`, then append): watched too by jit.
    self.static_containers: list = []

  def visit(self, value: Any, path: PathParts) -> tuple:
    if isinstance(value, Variable):
      key = id(value)
      if key in self.index:
        return (REF, self.index[key])
      idx = self.index[key] = len(self.index)
      self.nodes.append(value)
      self.variables.append(value)
      self.pairs.append((path, detach(value) if self.detach else value))
      return (VAR, type(value), idx, value.frozen_metadata())
    if isinstance(value, Object):
      key = id(value)
      if key in self.index:
        return (REF, self.index[key])
      idx = self.index[key] = len(self.index)
      self.nodes.append(value)
      attrs = tuple((name, self.visit(sub, path + (name,)))
                    for name, sub in value.__dict__.items())
      return (NODE, type(value), idx, attrs, None)
    typ = type(value)
    if typ in (list, List, dict, Dict):
      if not has_data(value):
        if typ in (List, Dict):
          self.static_containers.append(value)
        return (STATIC, _Static(value))
      key = id(value)
      if key in self.index:
        return (REF, self.index[key])
      idx = self.index[key] = len(self.index)
      self.nodes.append(value)
      if typ in (dict, Dict):
        attrs = tuple((k, self.visit(v, path + (k,))) for k, v in value.items())
      else:
        attrs = tuple((i, self.visit(v, path + (i,))) for i, v in enumerate(value))
      return (NODE, typ, idx, attrs, None)
    if typ is tuple:
      if not has_data(value):
        return (STATIC, _Static(value))
      attrs = tuple((i, self.visit(v, path + (i,))) for i, v in enumerate(value))
      return (NODE, tuple, -1, attrs, None)
    if _is_array(value):
      self.has_raw = True
      self.variables.append(None)
      self.pairs.append((path, value))
      return (LEAF,)
    if has_data(value):
      keyed, treedef = jax.tree_util.tree_flatten_with_path(value, is_leaf=_stop_at_nodes)
      # Children are named by their whole key path inside the pytree.
      keys = tuple(tuple(_key_name(k) for k in keypath) for keypath, _ in keyed)
      children = tuple(self.visit(v, path + key) for key, (_, v) in zip(keys, keyed))
      return (PYTREE, treedef, children, keys)
    return (STATIC, _Static(value))


def _key_name(k) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def detach(var: Variable) -> Variable:
  """A copy of a Variable sharing its value and metadata (not its identity)."""
  new = object.__new__(type(var))
  init = object.__setattr__
  init(new, "raw_value", var.raw_value)
  init(new, "_meta", var._meta)
  init(new, "_frozen", var._frozen)
  init(new, "_trace", tracectx.current_frame())
  init(new, "_watched", False)
  return new


def flatten(node: Any, *, detach_variables: bool = True) -> tuple[GraphDef, _Flattener]:
  """Walks a graph once; returns its GraphDef and the walk's records."""
  f = _Flattener(detach_variables)
  spec = f.visit(node, ())
  return GraphDef(spec), f


# --------------------------------------------------------------------------------
# Unflatten
# --------------------------------------------------------------------------------


class _Builder:
  """Rebuilds objects from a spec, taking leaves from `take(path, spec)`."""

  __slots__ = ("take", "nodes")

  def __init__(self, take: Callable):
    self.take = take
    self.nodes: dict[int, Any] = {}

  def build(self, spec: tuple, path: PathParts) -> Any:
    tag = spec[0]
    if tag == VAR:
      var = self.take(path, spec)
      self.nodes[spec[2]] = var
      return var
    if tag == NODE:
      typ, idx, attrs = spec[1], spec[2], spec[3]
      if typ is tuple:
        return tuple(self.build(sub, path + (k,)) for k, sub in attrs)
      if typ in (list, List):
        out = typ()
        self.nodes[idx] = out
        list.extend(out, (self.build(sub, path + (k,)) for k, sub in attrs))
        return out
      if typ in (dict, Dict):
        out = typ()
        self.nodes[idx] = out
        for k, sub in attrs:
          dict.__setitem__(out, k, self.build(sub, path + (k,)))
        return out
      obj = object.__new__(typ)
      init_object_slots(obj)
      self.nodes[idx] = obj
      d = obj.__dict__
      for k, sub in attrs:
        d[k] = self.build(sub, path + (k,))
      return obj
    if tag == REF:
      return self.nodes[spec[1]]
    if tag == LEAF:
      return self.take(path, spec)
    if tag == STATIC:
      return spec[1].value
    if tag == PYTREE:
      children = [self.build(sub, path + key) for key, sub in zip(spec[3], spec[2])]
      return jax.tree_util.tree_unflatten(spec[1], children)
    raise errors.GraphError(f"Corrupt GraphDef spec at {errors.path_str(path)}: {spec!r}")


def _variable_from(spec: tuple, leaf: Any) -> Any:
  """Makes a fresh Variable for a VAR spec from a State leaf or a raw value."""
  if isinstance(leaf, Variable):
    return detach(leaf)
  return make_variable(spec[1], spec[3], leaf)


def make_variable(cls: type, frozen_meta: tuple, value: Any) -> Variable:
  """Builds a Variable of `cls` from frozen metadata without validation."""
  new = object.__new__(cls)
  init = object.__setattr__
  init(new, "raw_value", value)
  init(new, "_meta", None)
  init(new, "_frozen", frozen_meta)
  init(new, "_trace", tracectx.current_frame())
  init(new, "_watched", False)
  return new


def unflatten_ordered(graphdef: GraphDef, values: list) -> Any:
  """Rebuilds a graph taking leaf values in DFS order (used by transforms)."""
  it = iter(values)

  def take(path, spec):
    value = next(it)
    if spec[0] == VAR:
      return make_variable(spec[1], spec[3], value)
    return value

  return _Builder(take).build(graphdef.spec, ())


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
    elif graphdef.spec[0] in (VAR, LEAF) and (isinstance(s, Variable) or _is_array(s)):
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
    return _variable_from(spec, leaf) if spec[0] == VAR else _raw(leaf)

  node = _Builder(take).build(graphdef.spec, ())
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
        "if you split by several filters).")
  return node


def _raw(leaf):
  return leaf.raw_value if isinstance(leaf, Variable) else leaf


def update(node: Any, state: State, /, *states: State) -> None:
  """Writes States into a live graph, in place (new paths create Variables)."""
  for s in (state,) + states:
    if not isinstance(s, State):
      s = State(s)
    for path, leaf in s.flat_state():
      _set_path(node, path, leaf)


def _child(obj: Any, key: Any) -> Any:
  if isinstance(obj, Object):
    return obj.__dict__.get(key, _MISSING)
  if isinstance(obj, dict):
    return obj.get(key, _MISSING)
  if isinstance(obj, (list, tuple)):
    return obj[key] if isinstance(key, int) and 0 <= key < len(obj) else _MISSING
  return _MISSING


_MISSING = object()


def _set_path(root: Any, path: PathParts, leaf: Any) -> None:
  parent = root
  for i, key in enumerate(path[:-1]):
    parent = _child(parent, key)
    if parent is _MISSING:
      raise errors.GraphError(
          f"update: path {errors.path_str(path)} does not exist in the graph "
          f"(no {errors.path_str(path[:i + 1])}); update can add Variables to "
          "existing nodes but not create nodes.")
  key = path[-1]
  target = _child(parent, key)
  if isinstance(target, Variable):
    if isinstance(leaf, Variable):
      object.__setattr__(target, "raw_value", leaf.raw_value)
      if leaf._meta is not target._meta or leaf._frozen is not target._frozen:
        if leaf.frozen_metadata() != target.frozen_metadata():
          target.set_metadata(**leaf.get_metadata())
    else:
      object.__setattr__(target, "raw_value", leaf)
    return
  new = detach(leaf) if isinstance(leaf, Variable) else leaf
  if isinstance(parent, Object):
    setattr(parent, key, new)
  elif isinstance(parent, (dict, list)):
    parent[key] = new
  else:
    raise errors.GraphError(
        f"update: cannot set {errors.path_str(path)} inside a "
        f"{type(parent).__name__} (immutable); rebuild it with merge instead.")


def pop(node: Any, *filters) -> State | tuple[State, ...]:
  """Removes the Variables matching each filter from the graph; returns them."""
  if not filters:
    raise errors.FilterError("pop needs at least one filter, e.g. pop(model, nnx.Intermediate).")
  _, f = flatten(node)
  parts = split_pairs(f.pairs, filters, exhaustive=False)[:len(filters)]
  for part in parts:
    for path, _ in part:
      parent = node
      for key in path[:-1]:
        parent = _child(parent, key)
      if isinstance(parent, Object):
        delattr(parent, path[-1])
      elif isinstance(parent, (dict, list)):
        del parent[path[-1]]
      else:
        raise errors.GraphError(
            f"pop: cannot remove {errors.path_str(path)} from an immutable "
            f"{type(parent).__name__}.")
  states = tuple(State.from_flat_path(p) for p in parts)
  return states[0] if len(states) == 1 else states


def clone(node: Any) -> Any:
  """A deep copy of a graph (shared references stay shared within the copy)."""
  return merge(*split(node))


def iter_graph(node: Any) -> Iterator[tuple[PathParts, Any]]:
  """Yields ``(path, value)`` for every node and leaf, children before parents.

  Each shared node is yielded once, at its first path. The walk is taken
  before the first item is yielded, so the graph may be modified while
  iterating (model surgery).
  """
  out: list = []
  seen: set = set()

  def visit(value, path):
    if isinstance(value, (Object, Variable, List, Dict, list, dict)):
      if id(value) in seen:
        return
      seen.add(id(value))
    if isinstance(value, Object):
      for k, sub in list(value.__dict__.items()):
        visit(sub, path + (k,))
    elif isinstance(value, (dict, Dict)):
      if has_data(value):
        for k, sub in list(value.items()):
          visit(sub, path + (k,))
      else:
        return
    elif isinstance(value, (list, tuple)):
      if has_data(value):
        for i, sub in enumerate(value):
          visit(sub, path + (i,))
      else:
        return
    elif not (isinstance(value, Variable) or _is_array(value)):
      return
    out.append((path, value))

  visit(node, ())
  yield from out


def iter_children(node: Object) -> Iterator[tuple[Any, Object]]:
  """Yields ``(name, child)`` for the direct Object children of a node."""
  for name, value in node.__dict__.items():
    if isinstance(value, Object):
      yield name, value
