"""Sharding constraints on activations, by logical axis names.

``constrain(x, ("batch", "length", "embed"))`` resolves the names with the
ambient rules and mesh and applies `jax.lax.with_sharding_constraint`. It is
meant for activations inside a jitted function; outside any `use_sharding`
block it returns ``x`` unchanged, so layers can call it unconditionally.

>>> import jax.numpy as jnp
>>> x = jnp.ones((8, 4))
>>> constrain(x, ("batch", "embed")) is x   # no active context: a no-op
True
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

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
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
