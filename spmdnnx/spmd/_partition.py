"""PartitionSpecs and NamedShardings for whole Modules and States.

Two ways to name shardings meet here. Inside ``use_sharding(mesh, rules)``
(or given ``rules=``) each Variable's logical axes go through `AxisRules`
(priorities, divisibility fallbacks, unknown names are errors). Outside any
context, with no rules given, Flax's convention applies: names are mapped by
the innermost ``nnx.logical_axis_rules`` block and the Variable's
``sharding_rules`` metadata, and a name no rule maps is taken as a mesh axis
(`get_named_sharding` checks that the mesh has it). A Variable whose
``out_sharding`` is a PartitionSpec or NamedSharding keeps that spec in both.

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
from jax.sharding import NamedSharding, PartitionSpec

from spmdnnx import _eager as eager
from spmdnnx import _graph as graph
from spmdnnx import errors
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


def _flax_entries(leaf: Any) -> tuple:
  """A leaf's spec entries renamed by Flax-style rules (empty if unannotated)."""
  if not isinstance(leaf, Variable):
    return ()
  meta = leaf.get_metadata()
  physical = meta.get("out_sharding")
  entries = eager.physical_spec(physical) if physical is not None else meta.get("logical_axes")
  if not entries:
    return ()
  rules = eager.composite_rules(eager.get_logical_axis_rules(), meta.get("sharding_rules"))
  return eager.map_names(tuple(entries), rules)


def _flax_specs(paths: list, leaves: list, mesh: Any) -> list[PartitionSpec]:
  """Specs by Flax's convention; with a mesh, names it lacks are checked.

  Raises:
    ShardingError: listing every leaf that names an axis the mesh lacks (other
      than spmdnnx's standard logical names, which stay replicated).
  """
  entries = [_flax_entries(leaf) for leaf in leaves]
  if mesh is None:
    return [PartitionSpec(*e) for e in entries]
  specs, bad = [], []
  for path, leaf, e in zip(paths, leaves, entries):
    own = eager.physical_mesh(leaf.get_metadata().get("out_sharding")) \
        if isinstance(leaf, Variable) else None
    e, unknown = eager.to_mesh_axes(e, {}, (own or mesh).axis_names)
    if unknown:
      bad.append((errors.path_str(path), unknown))
    specs.append(PartitionSpec(*e))
  if bad:
    raise errors.ShardingError(
        f"These Variables name axes the mesh {tuple(mesh.axis_names)} lacks: "
        f"{errors.format_paths([f'{p} {m}' for p, m in bad])}. Map logical names to "
        "mesh axes with `nnx.logical_axis_rules([...])` or pass rules= (or use "
        "`nnx.use_sharding(mesh, rules)`).", paths=[p for p, _ in bad],
        axes=[m for _, m in bad], mesh_axes=tuple(mesh.axis_names))
  return specs


def _flax_mode(rules: Any) -> bool:
  return rules is None and context_lib.current_context() is None


def _sharding_of(leaf: Any, mesh: Any, spec: PartitionSpec) -> NamedSharding:
  physical = leaf.get_metadata().get("out_sharding") if isinstance(leaf, Variable) else None
  own = eager.physical_mesh(physical)
  return NamedSharding(mesh if own is None else own, spec)


def get_partition_spec(tree: Any, rules: Any = None, mesh: Any = None) -> Any:
  """PartitionSpecs for every leaf of a Module, State or pytree.

  Args:
    tree: a Module, State, abstract State or pytree of Variables/arrays.
    rules: `AxisRules` (or anything `use_sharding` accepts); default: the
      ambient context's; with neither, Flax's convention (module docstring).
    mesh: used only for its axis sizes (divisibility fallbacks); default:
      the ambient context's. Without any mesh every rule is taken to divide.

  Returns:
    The State (or pytree) with a PartitionSpec in place of each value.

  Raises:
    AxisRulesError, MetadataError: as `leaf_specs`.

  >>> import jax.numpy as jnp
  >>> from spmdnnx._variables import Param
  >>> get_partition_spec(Param(jnp.ones((4, 2)), out_sharding=("data", None))).value
  P('data', None)
  """
  paths, leaves, treedef = flatten_with_paths(tree)
  if _flax_mode(rules):
    specs = _flax_specs(paths, leaves, mesh)
  else:
    mesh, rules = context_lib.mesh_and_rules(mesh, rules, need_mesh=False,
                                             what="get_partition_spec")
    sizes = None if mesh is None else mesh_axes_lib.axis_sizes(mesh)
    specs = resolve_lib.leaf_specs(paths, leaves, rules, sizes)
  return jax.tree_util.tree_unflatten(treedef, _replace_values(leaves, specs))


def get_named_sharding(tree: Any, mesh: Any = None, rules: Any = None) -> Any:
  """NamedShardings for every leaf of a Module, State or pytree.

  Args:
    tree: a Module, State, abstract State or pytree of Variables/arrays.
    mesh: a Mesh (or AbstractMesh, for planning); default: the context's,
      else the one `jax.set_mesh` made current.
    rules: default: the context's; with neither, Flax's convention.

  Returns:
    The State (or pytree) with a NamedSharding in place of each value.

  Raises:
    ShardingError: if no mesh is given or active, or (Flax's convention) a
      Variable names an axis the mesh lacks.
    AxisRulesError, MetadataError: as `leaf_specs`.

  Warns:
    ShardingWarning: once, for every dimension no rule divides.
  """
  paths, leaves, treedef = flatten_with_paths(tree)
  if _flax_mode(rules):
    mesh = eager.ambient_mesh() if mesh is None else mesh
    if mesh is None:
      raise errors.ShardingError(
          "get_named_sharding needs a mesh: pass it (get_named_sharding(tree, mesh)), "
          "run inside `with jax.set_mesh(mesh):` or `nnx.use_sharding(mesh, rules)`.",
          missing=["mesh"], what="get_named_sharding")
    specs = _flax_specs(paths, leaves, mesh)
  else:
    mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="get_named_sharding")
    specs = resolve_lib.leaf_specs(paths, leaves, rules, mesh)
  shardings = [_sharding_of(leaf, mesh, s) for leaf, s in zip(leaves, specs)]
  return jax.tree_util.tree_unflatten(treedef, _replace_values(leaves, shardings))
