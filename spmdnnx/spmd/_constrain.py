"""Sharding constraints on activations, by logical axis names.

``constrain(x, ("batch", "length", "embed"))`` resolves the names with the
ambient rules and mesh and applies `jax.lax.with_sharding_constraint`. It is
meant for activations inside a jitted function; outside any `use_sharding`
block it returns ``x`` unchanged, so layers can call it unconditionally.

Layers call `layout_activation` instead: the same constraint where the rules
can express it, and silently nothing where they cannot (no context, rules
without those names, a shard_map body), so a layer's default output layout
never raises or warns.

>>> import jax.numpy as jnp
>>> x = jnp.ones((8, 4))
>>> constrain(x, ("batch", "embed")) is x   # no active context: a no-op
True
>>> layout_activation(x, ("activation_batch", "activation_embed")) is x
True
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _rules as rules_lib


def constrain(x: Any, logical_axes: Sequence[str | None], *, mesh: Any = None,
              rules: Any = None, name: str = "activation") -> Any:
  """Constrains an array's sharding by logical axis names.

  Args:
    x: an array (usually a traced activation).
    logical_axes: one logical name (or None) per dimension of ``x``.
    mesh: default: the ambient context's. Without a concrete Mesh this is a
      no-op.
    rules: default: the ambient context's. Without rules this is a no-op.
    name: how ``x`` is named in messages.

  Returns:
    ``x`` with a sharding constraint (or ``x`` itself when no context).

  Raises:
    MetadataError: if ``logical_axes`` does not match ``x``'s rank.
    AxisRulesError: if a logical name has no rule.

  Warns:
    ShardingWarning: for dimensions no rule can divide (then replicated).
  """
  ctx = context_lib.current_context()
  if ctx is not None:
    mesh = ctx.mesh if mesh is None else mesh
    rules = ctx.rules if rules is None else rules
  if rules is None:
    return x
  logical_axes = (logical_axes,) if isinstance(logical_axes, str) else tuple(logical_axes)
  rules = rules_lib.as_rules(rules)
  shape = tuple(x.shape)
  rules_lib.check_rank((name,), logical_axes, shape)
  if not isinstance(mesh, Mesh):
    # Rules but no devices: still report unknown names, then do nothing.
    rules_lib.report_problems([((name,), rules.resolve_detailed(logical_axes, shape, None))],
                              rules)
    return x
  spec = rules.resolve(logical_axes, shape, mesh, path=(name,))
  if _all_explicit(mesh) and not _in_manual_region():
    # Explicit axes: the sharding is part of the type; reshard changes it.
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _all_explicit(mesh: Any) -> bool:
  return bool(mesh.axis_types) and all(t == AxisType.Explicit for t in mesh.axis_types)


def _in_manual_region() -> bool:
  ambient = jax.sharding.get_abstract_mesh()
  return not ambient.empty and bool(ambient.manual_axes)


def explicit_out_sharding(logical_axes: Sequence[str | None],
                          shape: Sequence[int]) -> NamedSharding | None:
  """The ``out_sharding=`` a matmul needs on an Explicit mesh, else None.

  On a mesh whose axes are all `AxisType.Explicit`, JAX asks for the output
  sharding of a contraction whose contracting dimensions are sharded
  (``ShardingTypeError`` otherwise). Inside ``use_sharding`` with such a mesh
  this resolves the output's logical names by the rules; everywhere else
  (Auto meshes, no context, a shard_map body) it returns None, which
  ``jnp.einsum(..., out_sharding=None)`` treats as "let JAX decide".

  >>> explicit_out_sharding(("activation_batch", "activation_embed"), (8, 4)) is None
  True
  """
  ctx = context_lib.current_context()
  if ctx is None or not isinstance(ctx.mesh, Mesh) or not _all_explicit(ctx.mesh):
    return None
  if _in_manual_region():
    return None
  spec = ctx.rules.resolve(tuple(logical_axes), tuple(shape), ctx.mesh,
                           path=("activation",))
  return NamedSharding(ctx.mesh, spec)


def layout_activation(x: Any, logical_axes: Sequence[str | None] | None) -> Any:
  """Constrains a layer's output by logical names when the ambient rules can.

  Unlike `constrain` this never raises or warns: it returns ``x`` unchanged
  when no `use_sharding` context with a concrete, all-`Auto` Mesh is active,
  inside a `shard_map` body, when ``logical_axes`` is None or does not match
  ``x``'s rank, or when the rules do not mention every name. A dimension no
  rule can divide is left unconstrained (XLA chooses) instead of replicated.

  Args:
    x: the layer output (usually traced).
    logical_axes: one logical name (or None) per dimension, or None.

  Returns:
    ``x``, constrained where possible.
  """
  ctx = context_lib.current_context()
  if ctx is None or logical_axes is None or not isinstance(ctx.mesh, Mesh):
    return x
  logical_axes = tuple(logical_axes)
  shape = tuple(getattr(x, "shape", ()))
  if len(logical_axes) != len(shape) or any(
      n is not None and n not in ctx.rules for n in logical_axes):
    return x
  explicit = _all_explicit(ctx.mesh)
  if not explicit and any(t != AxisType.Auto for t in ctx.mesh.axis_types):
    return x
  if _in_manual_region():
    return x  # inside shard_map: the mesh axes are manual here
  res = ctx.rules.resolve_detailed(logical_axes, shape, ctx.mesh)
  if res.missing:
    return x
  if explicit:
    return jax.sharding.reshard(x, NamedSharding(ctx.mesh, res.spec))
  undivided = {dim for dim, *_ in res.undivided}
  spec = PartitionSpec(*(PartitionSpec.UNCONSTRAINED if i in undivided else e
                         for i, e in enumerate(res.spec)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))
