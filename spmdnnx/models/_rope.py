"""Rotary position embeddings (RoPE).

Each head vector is split into two halves ``(x1, x2)``; pair ``i`` is rotated
by the angle ``position * theta ** (-2 i / head_dim)``. A query at position
``m`` and a key at position ``n`` then have a dot product that depends on
``m - n`` only, which is what gives attention its relative-position bias.

>>> import jax.numpy as jnp
>>> x = jnp.ones((1, 3, 2, 4))                       # [batch, length, heads, head_dim]
>>> apply_rope(x, jnp.arange(3)[None], theta=10_000.0).shape
(1, 3, 2, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Rotation angles ``[..., head_dim // 2]`` (float32) for integer ``positions``."""
  exponents = jnp.arange(0, head_dim // 2, dtype=jnp.float32) * (2.0 / head_dim)
  inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
  """Rotates ``x`` (``[batch, length, heads, head_dim]``) by its ``positions`` (``[batch, length]``).

  Computed in float32 and cast back to ``x.dtype``.
  """
  half = x.shape[-1] // 2
  angles = rope_angles(positions, x.shape[-1], theta)[:, :, None, :]  # [B, T, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
