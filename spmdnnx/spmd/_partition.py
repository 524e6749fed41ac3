"""PartitionSpecs and NamedShardings for whole Modules and States.

`get_partition_spec` and `get_named_sharding` accept a Module (its full
State is used), a State, an abstract State (values are
`jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`) or any pytree whose
leaves are Variables or arrays. They return the same structure with each
leaf's *value* replaced: a Variable keeps its type and metadata and holds a
PartitionSpec (or NamedSharding) instead of its array, and a bare array
becomes a spec/sharding itself. A State of shardings therefore lines up with
the State it describes, as ``jax.jit(..., out_shardings=...)`` and
``jax.device_put`` expect.

>>> import jax.numpy as jnp
>>> from spmdnnx._state import State
>>> from spmdnnx._variables import Param
>>> s = State({"w": Param(jnp.zeros((8, 4)), logical_axes=("embed", "mlp"))})
>>> get_partition_spec(s, rules=[("embed", "fsdp"), ("mlp", None)]).w.value
P('fsdp', None)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from spmdnnx import _graph as graph
from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _mesh_axes as mesh_axes_lib
from spmdnnx.spmd import _resolve as resolve_lib
from spmdnnx._variables import Variable


def _is_leaf(x: Any) -> bool:
  return isinstance(x, Variable)


def _key(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def flatten_with_paths(tree: Any) -> tuple[list[tuple], list[Any], Any]:
  """Flattens a Module/State/pytree into (paths, leaves, treedef).

  A graph node is first replaced by its full State. Variables are leaves.
  """
  if graph.is_graph_node(tree) and not isinstance(tree, Variable):
    tree = graph.state(tree)
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  paths = [tuple(_key(e) for e in p) for p, _ in pairs]
  return paths, [leaf for _, leaf in pairs], treedef


def _replace_values(leaves: list[Any], new_values: list[Any]) -> list[Any]:
  return [leaf.replace(value=v) if isinstance(leaf, Variable) else v
          for leaf, v in zip(leaves, new_values)]


def get_partition_spec(tree: Any, rules: Any = None, mesh: Any = None) -> Any:
  """PartitionSpecs for every leaf of a Module, State or pytree.

  Args:
    tree: a Module, State, abstract State or pytree of Variables/arrays.
    rules: `AxisRules` (or anything `use_sharding` accepts); default: the
      ambient context's.
    mesh: used only for its axis sizes (divisibility fallbacks); default:
      the ambient context's. Without any mesh every rule is taken to divide.

  Returns:
    The State (or pytree) with a PartitionSpec in place of each value.

  Raises:
    ShardingError: if no rules are given or active.
    AxisRulesError, MetadataError: as `leaf_specs`.
  """
  mesh, rules = context_lib.mesh_and_rules(mesh, rules, need_mesh=False,
                                         what="get_partition_spec")
  sizes = None if mesh is None else mesh_axes_lib.axis_sizes(mesh)
  paths, leaves, treedef = flatten_with_paths(tree)
  specs = resolve_lib.leaf_specs(paths, leaves, rules, sizes)
  return jax.tree_util.tree_unflatten(treedef, _replace_values(leaves, specs))


def get_named_sharding(tree: Any, mesh: Any = None, rules: Any = None) -> Any:
  """NamedShardings for every leaf of a Module, State or pytree.

  Args:
    tree: a Module, State, abstract State or pytree of Variables/arrays.
    mesh: a Mesh (or AbstractMesh, for planning); default: the context's.
    rules: default: the context's.

  Returns:
    The State (or pytree) with a NamedSharding in place of each value.

  Raises:
    ShardingError: if no mesh or rules are given or active.
    AxisRulesError, MetadataError: as `leaf_specs`.

  Warns:
    ShardingWarning: once, for every dimension no rule divides.
  """
  mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="get_named_sharding")
  paths, leaves, treedef = flatten_with_paths(tree)
  specs = resolve_lib.leaf_specs(paths, leaves, rules, mesh)
  shardings = [NamedSharding(mesh, s) for s in specs]
  return jax.tree_util.tree_unflatten(treedef, _replace_values(leaves, shardings))

