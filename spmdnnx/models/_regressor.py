"""A small residual MLP regressor: the smoke-test and benchmark model of the SPMD core."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmdnnx._module import Module
from spmdnnx.nn._linear import Linear
from spmdnnx.nn._normalization import LayerNorm
from spmdnnx._object import List
from spmdnnx._rngs import Rngs
from spmdnnx.spmd._constrain import constrain


class MLPBlock(Module):
  """Pre-norm residual MLP block: x + W2 gelu(W1 norm(x))."""

  def __init__(self, embed: int, mlp: int, *, rngs: Rngs):
    self.norm = LayerNorm(embed, rngs=rngs)
    self.up = Linear(embed, mlp, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(mlp, embed, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.up(self.norm(x)))
    h = constrain(h, ("batch", "mlp"))
    return x + self.down(h)


class MLPRegressor(Module):
  """In-projection, residual MLP blocks with logical axes, head (regression).

  >>> import jax.numpy as jnp
  >>> m = MLPRegressor(4, embed=8, mlp=16, num_layers=2, out_features=1, rngs=Rngs(0))
  >>> m(jnp.ones((3, 4))).shape
  (3, 1)
  """

  def __init__(self, in_features: int, *, embed: int, mlp: int, num_layers: int,
               out_features: int, rngs: Rngs):
    self.embed = Linear(in_features, embed, kernel_axes=(None, "embed"), rngs=rngs)
    self.blocks = List([MLPBlock(embed, mlp, rngs=rngs) for _ in range(num_layers)])
    self.head = Linear(embed, out_features, kernel_axes=("embed", None), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(self.embed(x), ("batch", "embed"))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all elements."""
  return jnp.mean((pred - target) ** 2)
