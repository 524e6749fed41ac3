"""Resolving many Variables at once, with one error or warning for all of them.

These flat helpers take parallel lists of paths and leaves (Variables, arrays
or `jax.ShapeDtypeStruct`s) and are what the tree-level functions and the
lifted `jit` build on. A Variable without ``logical_axes`` and a bare array
are replicated.

>>> import jax.numpy as jnp
>>> from spmdnnx._variables import Param
>>> w = Param(jnp.zeros((8, 4)), logical_axes=("embed", "mlp"))
>>> leaf_specs([("w",)], [w], [("embed", "fsdp"), ("mlp", "tensor")],
...            {"fsdp": 4, "tensor": 2})
[P('fsdp', 'tensor')]
"""

from __future__ import annotations

from typing import Any, Sequence

from jax.sharding import NamedSharding, PartitionSpec

from spmdnnx import _eager as eager
from spmdnnx import errors
from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _mesh_axes as mesh_axes_lib
from spmdnnx.spmd import _rules as rules_lib
from spmdnnx._variables import Variable

REPLICATED = PartitionSpec()


def leaf_shape(leaf: Any) -> tuple[int, ...] | None:
  """The shape of a Variable's value or of an array-like, else None."""
  value = leaf.raw_value if isinstance(leaf, Variable) else leaf
  shape = getattr(value, "shape", None)
  return None if shape is None else tuple(shape)


def leaf_axes(leaf: Any) -> tuple | None:
  """The logical axes of a Variable, None for anything else."""
  return leaf.logical_axes if isinstance(leaf, Variable) else None


def leaf_specs(paths: Sequence[Any], leaves: Sequence[Any], rules: Any,
               mesh: Any) -> list[PartitionSpec]:
  """Resolves each leaf to a PartitionSpec, reporting problems once.

  Args:
    paths: one path (tuple of keys) per leaf, used in messages.
    leaves: Variables, arrays or ShapeDtypeStructs.
    rules: `AxisRules` or anything `as_rules` accepts.
    mesh: a Mesh, AbstractMesh or ``{axis: size}`` dict (None: no mesh yet,
      every rule applies).

  Returns:
    One PartitionSpec per leaf (``P()`` for unannotated leaves).

  Raises:
    MetadataError: listing every leaf whose logical axes differ from its rank.
    AxisRulesError: listing every leaf with a logical name no rule mentions,
      or rules naming mesh axes the mesh lacks.

  Warns:
    ShardingWarning: once, listing every dimension no rule could divide.
  """
  axes_list = [leaf_axes(leaf) for leaf in leaves]
  shapes = [leaf_shape(leaf) for leaf in leaves]
  specs = resolve_all(paths, axes_list, shapes, rules, mesh)
  # A PartitionSpec/NamedSharding given as `out_sharding` names mesh axes itself.
  for i, leaf in enumerate(leaves):
    if isinstance(leaf, Variable) and leaf.logical_axes is None:
      physical = leaf.get_metadata().get("out_sharding")
      if physical is not None:
        specs[i] = eager.physical_spec(physical)
  return specs


def resolve_all(paths: Sequence[Any], axes_list: Sequence[Sequence[str | None] | None],
                shapes: Sequence[Sequence[int] | None], rules: Any,
                mesh: Any) -> list[PartitionSpec]:
  """Resolves parallel lists of logical axes and shapes; see `leaf_specs`.

  An entry whose axes or shape is None is replicated (``P()``). With
  ``mesh=None`` every rule is taken to apply (planning before a mesh exists).
  """
  rules = rules_lib.as_rules(rules)
  sizes = None if mesh is None else mesh_axes_lib.axis_sizes(mesh)
  if sizes is not None:
    rules.validate(sizes)
  specs: list[PartitionSpec] = []
  results = []
  bad_rank: list[str] = []
  bad_fields: list[tuple] = []
  for path, axes, shape in zip(paths, axes_list, shapes, strict=True):
    if axes is None or shape is None:
      specs.append(REPLICATED)
      continue
    axes, shape = tuple(axes), tuple(shape)
    if len(axes) != len(shape):
      bad_rank.append(f"{errors.path_str(path)} (axes {axes!r}, shape {shape})")
      bad_fields.append((errors.path_str(path), shape, axes))
      specs.append(REPLICATED)
      continue
    res = rules.resolve_detailed(axes, shape, sizes)
    results.append((path, res))
    specs.append(res.spec)
  if bad_rank:
    raise errors.MetadataError(
        f"logical_axes length differs from the array rank for: "
        f"{errors.format_paths(bad_rank)}. Give one name (or None) per dimension.",
        paths=[f[0] for f in bad_fields], shapes=[f[1] for f in bad_fields],
        axes=[f[2] for f in bad_fields])
  rules_lib.report_problems(results, rules)
  return specs

def leaf_shardings(paths: Sequence[Any], variables: Sequence[Any], mesh: Any = None,
                   rules: Any = None) -> list[NamedSharding]:
  """Like `leaf_specs`, but returns NamedShardings on ``mesh``.

  ``mesh`` and ``rules`` default to the ambient `use_sharding` context.

  Raises:
    ShardingError: if no mesh or rules are given or active; otherwise as
      `leaf_specs`.
  """
  mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="leaf_shardings")
  specs = leaf_specs(paths, variables, rules, mesh)
  return [NamedSharding(mesh, s) for s in specs]
