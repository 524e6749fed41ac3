"""Tree mode: flatten a graph as a plain JAX pytree (``graph=False``).

In tree mode Objects (Modules, Rngs, ...) are pytrees and the structure is a
JAX treedef, so nothing tracks identity: a Variable (or an Object holding
data) reachable twice is an error instead of a shared reference. It is the
simpler and faster of the two modes; graph mode (`spmdnnx._graph.Walk`)
keeps sharing and cycles.

A tree-mode GraphDef's spec is a `TreeSpec`: the treedef (Variables as
leaves), the path of each leaf in treedef order, and for each leaf the
Variable type and frozen metadata (or None for a raw leaf), so that raw
values (e.g. from ``to_pure_dict``) are boxed back into Variables on merge.

>>> import jax.numpy as jnp
>>> from spmdnnx._variables import Param
>>> spec, pairs = tree_flatten({"w": Param(jnp.ones(2)), "n": 3})
>>> sorted(p for p, _ in pairs)
[('n',), ('w',)]
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from spmdnnx import errors
from spmdnnx._graphdef import TreeSpec
from spmdnnx._object import Object, has_data
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable, detach, new_variable

_REF = getattr(jax, "Ref", Variable)  # mutable array references (jax.new_ref)

TREE_MODE_HINT = (
    "Tree mode (graph=False) does not support shared references; pass "
    "graph=True (or use nnx.set_graph_mode(True)) to keep them shared, or "
    "give each position its own object.")


def duplicate_message(who: str, x: Any, first: PathParts, second: PathParts) -> str:
  """The tree-mode error for an object reachable twice."""
  return (f"{who}: the same {type(x).__name__} found at paths "
          f"{errors.path_str(first)} and {errors.path_str(second)}. {TREE_MODE_HINT}")


def cycle_message(who: str, x: Any, first: PathParts, second: PathParts) -> str:
  """The tree-mode error for a node that contains itself."""
  return (f"{who}: Cycle detected: the {type(x).__name__} found at paths "
          f"{errors.path_str(first)} and {errors.path_str(second)} contains itself. "
          f"{TREE_MODE_HINT}")


_KEY_ATTR = {jax.tree_util.GetAttrKey: "name", jax.tree_util.DictKey: "key",
             jax.tree_util.SequenceKey: "idx", jax.tree_util.FlattenedIndexKey: "key"}


def key_name(k: Any) -> Any:
  """The spmdnnx path key of a JAX key entry (attribute, dict key, index)."""
  attr = _KEY_ATTR.get(type(k))
  if attr is not None:
    return getattr(k, attr)
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def to_path(jax_path: tuple) -> PathParts:
  """A JAX key path as a tuple of spmdnnx path keys."""
  return tuple(key_name(k) for k in jax_path)


def check_pytree_object(x: Any, path: PathParts, who: str) -> None:
  """Raises for an Object that is not a pytree met in tree mode.

  Raises:
    GraphError: x is an Object declared with ``pytree=False``.
  """
  if isinstance(x, Object) and not type(x)._object__is_pytree:
    raise errors.GraphError(
        f"{who}: {type(x).__name__} is declared with pytree=False, so tree mode "
        f"(graph=False) cannot look inside it. Found at path "
        f"{errors.path_str(path)}. Use graph=True, or drop pytree=False from "
        "the class.", paths=[path])


def leaves_with_paths(node: Any, who: str, *, stop: Callable | None = None) -> tuple:
  """``([(path, leaf), ...], treedef)`` of a tree, Variables as leaves.

  Checks tree mode's rules on the way: no Variable (or data-holding Object)
  reachable twice, no ``pytree=False`` Object.

  Raises:
    GraphError: a shared reference or a non-pytree Object.
  """
  seen: dict[int, tuple] = {}

  def is_leaf(jpath, x):
    if isinstance(x, (Variable, _REF)):
      key = id(x)
      if key in seen:
        first, path = to_path(seen[key]), to_path(jpath)
        raise errors.GraphError(duplicate_message(who, x, first, path), paths=[first, path])
      seen[key] = jpath
      return isinstance(x, Variable)
    if isinstance(x, Object):
      key = id(x)
      if key in seen and has_data(x):
        first, path = to_path(seen[key]), to_path(jpath)
        raise errors.GraphError(duplicate_message(who, x, first, path), paths=[first, path])
      seen[key] = jpath
      if not type(x)._object__is_pytree:
        check_pytree_object(x, to_path(jpath), who)
    return stop is not None and stop(x)

  keyed, treedef = jax.tree_util.tree_flatten_with_path(
      node, is_leaf=is_leaf, is_leaf_takes_path=True)
  return [(to_path(p), v) for p, v in keyed], treedef


def tree_flatten(node: Any, who: str = "split") -> tuple[TreeSpec, list]:
  """The `TreeSpec` of a tree and its ``(path, leaf)`` pairs (treedef order).

  Leaves are the live Variables (and raw leaves) of the tree.
  """
  pairs, treedef = leaves_with_paths(node, who)
  kinds = tuple(
      (type(v), v.frozen_metadata()) if isinstance(v, Variable) else None
      for _, v in pairs)
  spec = TreeSpec(type(node), treedef, tuple(p for p, _ in pairs), kinds)
  return spec, pairs


def tree_unflatten(spec: TreeSpec, leaves: dict, copy: bool = False) -> tuple[Any, list]:
  """Rebuilds a tree from ``{path: leaf}``; returns ``(tree, missing paths)``.

  Leaves used are removed from `leaves` (what remains was not needed).
  """
  values, missing = [], []
  for path, kind in zip(spec.paths, spec.kinds):
    if path not in leaves:
      missing.append(path)
      values.append(None)
      continue
    leaf = leaves.pop(path)
    if kind is not None:
      if isinstance(leaf, Variable):
        leaf = detach(leaf) if copy else leaf
      else:
        leaf = new_variable(kind[0], leaf, frozen=kind[1])
    values.append(leaf)
  if missing:
    return None, missing
  return jax.tree_util.tree_unflatten(spec.treedef, values), missing


def iter_tree(node: Any, who: str = "iter_graph"):
  """Yields ``(path, value)`` for every pytree node and leaf, children first.

  Raises:
    GraphError: a Variable reachable twice, a cycle, or a ``pytree=False`` Object.
  """
  out: list = []
  seen: dict[int, PathParts] = {}
  active: dict[int, PathParts] = {}

  def visit(path: PathParts, x: Any) -> None:
    if isinstance(x, Variable):
      if id(x) in seen:
        raise errors.GraphError(duplicate_message(who, x, seen[id(x)], path),
                                paths=[seen[id(x)], path])
      seen[id(x)] = path
      out.append((path, x))
      return
    check_pytree_object(x, path, who)
    keyed, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if len(keyed) == 1 and not keyed[0][0]:  # x is a leaf
      out.append((path, x))
      return
    if id(x) in active:
      raise errors.GraphError(cycle_message(who, x, active[id(x)], path),
                              paths=[active[id(x)], path])
    active[id(x)] = path
    for jpath, sub in keyed:
      visit(path + (key_name(jpath[0]),), sub)
    del active[id(x)]
    out.append((path, x))

  visit((), node)
  yield from out
