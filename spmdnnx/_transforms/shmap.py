"""`shard_map` over graph objects: per-Variable in_specs.

``in_specs`` is a prefix of the arguments. Where it reaches a graph object
(a Module, a Variable) its value is one PartitionSpec for all of the object's
state, a `StateSharding` ({filter: spec}), or the `State` that `nnx.prefix`
builds. Where it reaches a pytree that holds graph objects (a `State` from
`nnx.split`, a list of Modules) it may be a matching pytree of specs. A
Variable reached through two arguments must get the same spec from both.

>>> import jax, jax.numpy as jnp
>>> import spmdnnx as nnx
>>> from jax.sharding import PartitionSpec as P
>>> mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
>>> graphdef, state = nnx.split(nnx.Linear(2, 16, rngs=nnx.Rngs(0)))
>>> spec = nnx.State({"kernel": P(None, "d"), "bias": P("d")})
>>> @nnx.shard_map(mesh=mesh, in_specs=(spec,), out_specs=P())
... def local_shape(state):
...   return jnp.array(state["kernel"].shape)
>>> local_shape(state).tolist()
[2, 2]
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec

from spmdnnx import errors
from spmdnnx import _graph as graphlib
from spmdnnx._state import State
from spmdnnx._transforms import guards
from spmdnnx._transforms import lift
from spmdnnx._transforms.guards import PrefixMap
from spmdnnx._transforms.prefixes import StateSharding


def _is_spec_leaf(spec: Any) -> bool:
  """Whether `spec` applies as a whole to everything under its position."""
  return spec is None or isinstance(spec, (PartitionSpec, PrefixMap)) or \
      jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(spec))


def _one_level(tree: Any) -> tuple:
  return jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)


def broadcast_specs(args: tuple, specs: tuple, what: str,
                    name: str = "in_specs") -> tuple[list, list]:
  """One spec per leaf of ``tree_flatten(args, is_leaf=is_graph_node)``.

  A graph object counts as one leaf and gets the spec at its position
  (which may be a StateSharding or a prefix State describing its state).

  Returns:
    ``(specs, where)``: the spec of each leaf and a readable location
    (argument number and pytree path) of each.

  Raises:
    TransformError: a spec pytree whose structure does not match the
      argument it is given for.
  """
  out: list = []
  where: list = []

  def walk(spec, sub, loc):
    if graphlib.is_graph_node(sub):
      out.append(spec)
      where.append(loc)
      return
    if _is_spec_leaf(spec) or isinstance(spec, State) and not isinstance(sub, State):
      if isinstance(spec, State):
        raise errors.TransformError(
            f"{what}: {name} gives a State at {loc} for a "
            f"{type(sub).__name__}, which is neither a graph object nor a State; "
            "give one value (or a pytree of them matching the argument).",
            paths=[loc])
      leaves = jax.tree_util.tree_leaves_with_path(sub, is_leaf=graphlib.is_graph_node)
      for path, _ in leaves:
        out.append(spec)
        where.append(loc + jax.tree_util.keystr(path))
      return
    spec_kids, spec_def = _one_level(spec)
    sub_kids, sub_def = _one_level(sub)
    if spec_def != sub_def:
      raise errors.TransformError(
          f"{what}: the {name} entry at {loc} has structure {spec_def} but the "
          f"argument there has structure {sub_def}; give one value for the "
          "whole argument or a pytree of values of the same structure.", paths=[loc])
    keys = [jax.tree_util.keystr(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(sub, is_leaf=lambda x: x is not sub)[0]]
    for key, s, x in zip(keys, spec_kids, sub_kids):
      walk(s, x, loc + key)

  for i, (arg, spec) in enumerate(zip(args, specs)):
    walk(spec, arg, f"argument {i}")
  return out, where


def leaf_spec(spec: Any, path: tuple, leaf: Any, what: str) -> Any:
  """The PartitionSpec of one state leaf at `path` inside a graph object.

  Raises:
    TransformError: a StateSharding with no matching filter; a prefix State
      without an entry for `path`; a spec of another kind.
  """
  if isinstance(spec, StateSharding):
    return spec.spec_for(path, leaf, "shard_map")
  if isinstance(spec, State):
    return state_prefix_value(spec, path, what, "in_specs")
  if spec is None or isinstance(spec, PartitionSpec):
    return spec
  raise errors.TransformError(
      f"{what}: in_specs for a graph object must be a PartitionSpec, a StateSharding "
      f"or an nnx.prefix State; got {spec!r} for {errors.path_str(path)}.",
      paths=[path])


def state_prefix_value(state: State, path: tuple, what: str, name: str) -> Any:
  """The value at `path` of a prefix `State` (as `nnx.prefix` builds).

  Raises:
    TransformError: the State has no entry for `path` (a prefix built from
      another object), instead of silently giving None.
  """
  flat = {tuple(p): v for p, v in state.flat_state()}
  if tuple(path) not in flat:
    raise errors.TransformError(
        f"{what}: the {name} State has no entry for {errors.path_str(path)} "
        f"(it has {errors.format_paths(map(errors.path_str, flat))}); build it from "
        "the same object with nnx.prefix(node, {filter: value, ...: default}).",
        paths=[path])
  return flat[tuple(path)]


def check_consistent(arg_leaves: list, specs: list, where: list, what: str) -> None:
  """Refuses a Variable that two arguments give different specs.

  Raises:
    TransformError: "Inconsistent aliasing detected", naming every such
      Variable with each path and spec.
  """
  occurrences = [(x, s, w) for x, s, w in zip(arg_leaves, specs, where)
                 if graphlib.is_graph_node(x)]
  if len(occurrences) < 2:
    return
  seen: dict[int, list] = {}
  kinds: dict[int, str] = {}
  for node, spec, loc in occurrences:
    _, w = graphlib.flatten(node)
    for (path, leaf), live in zip(w.pairs, w.variables):
      if live is None:
        continue
      value = leaf_spec(spec, path, leaf, what)
      at = f"{loc}/{errors.path_str(path)}" if path else loc
      seen.setdefault(id(live), []).append((at, value))
      kinds[id(live)] = type(live).__name__
  bad = []
  for key, uses in seen.items():
    values = []
    for _, v in uses:
      if v not in values:
        values.append(v)
    if len(values) > 1:
      bad.append((kinds[key], uses))
  if not bad:
    return
  lines = [f"{kind}:\n" + "\n".join(f"    {loc}: {v!r}" for loc, v in uses)
           for kind, uses in bad]
  raise errors.TransformError(
      f"{what}: Inconsistent aliasing detected. The following nodes have different "
      f"prefixes (each is reached through several arguments whose in_specs "
      f"differ):\n  " + "\n  ".join(lines[:10]) +
      ("\n  ..." if len(lines) > 10 else "") +
      "\nGive every path to a shared Variable the same spec, or pass a copy "
      "(nnx.clone) to one of the arguments.",
      paths=[loc for _, uses in bad for loc, _ in uses])


def shard_map(f: Callable | None = None, *, mesh: Any = None, in_specs: Any,
              out_specs: Any, check_vma: bool = True, axis_names: Any = None,
              graph: bool | None = None, graph_updates: bool | None = None) -> Callable:
  """`jax.shard_map` whose arguments may be graph objects.

  The function sees each Variable's local shard (its spec from `in_specs`,
  see the module docstring); the new values come out with the same specs
  and are written back into the objects. In graph mode a Variable may be
  shared between arguments (with equal specs); with ``graph=False`` that
  is an error.

  Raises:
    TransformError: `f` is bound; in_specs does not fit the arguments; a
      shared Variable with different specs; the function changed the
      objects' structure or returned a graph object.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if f is None:
    return functools.partial(shard_map, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=check_vma, axis_names=axis_names, graph=graph,
                             graph_updates=graph_updates)
  guards.check_unbound(f, "shard_map")
  guards.check_prefix(in_specs, "in_specs", "shard_map", graph, graph_updates)
  what = f"shard_map({lift.fun_name(f)})"

  @functools.wraps(f)
  def wrapper(*args):
    specs = in_specs if isinstance(in_specs, tuple) else (in_specs,) * len(args)
    if len(specs) != len(args):
      raise errors.TransformError(
          f"{what}: in_specs has {len(specs)} entries for {len(args)} arguments.")
    all_specs, where = broadcast_specs(args, specs, what)
    arg_leaves = jax.tree_util.tree_leaves(tuple(args), is_leaf=graphlib.is_graph_node)
    check_consistent(arg_leaves, all_specs, where, what)
    ex = lift.extract(tuple(args), aliasing=graph, who="shard_map")
    node_spec: dict = {}
    for x, spec in zip(ex.arg_leaves, all_specs):
      if isinstance(x, lift.NodeSlot):
        node_spec.setdefault(x.index, spec)
    leaf_specs = [leaf_spec(node_spec[p[0]], p[1:], leaf, what)
                  for p, leaf in zip(ex.paths, ex.leaves)]
    plain_specs = [s for x, s in zip(ex.arg_leaves, all_specs)
                   if not isinstance(x, lift.NodeSlot)]
    plain = lift.plain_leaves(ex)
    vals = [lift._raw(x) for x in ex.leaves]

    def inner(leaves, plain_leaves):
      new_leaves, restructure, out, has_nodes = lift.run_inside(
          ex.graphdef, ex.treedef, leaves, lift.fill_plain(ex, plain_leaves),
          lambda call_args: f(*call_args), what, identity="moved")
      if restructure is not None or has_nodes:
        raise errors.TransformError(
            f"{what}: the function must keep the graph's structure and return arrays "
            "(it added, removed or swapped Variables or sub-modules, or returned a graph "
            "object); create Modules outside shard_map and return their outputs.")
      return [lift._raw(x) for x in new_leaves], out

    kwargs = {"mesh": mesh} if mesh is not None else {}
    if axis_names is not None:
      kwargs["axis_names"] = axis_names
    mapped = jax.shard_map(inner, in_specs=(leaf_specs, plain_specs),
                           out_specs=(leaf_specs, out_specs), check_vma=check_vma, **kwargs)
    new_vals, out = mapped(vals, plain)
    lift.apply_updates(ex, new_vals, None)
    return out

  return wrapper
