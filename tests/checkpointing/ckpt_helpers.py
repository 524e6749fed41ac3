"""Shared models and helpers for the checkpointing tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spmdnnx as nnx
# (spmdnnx.train no longer ships this regression model; defined here.)

class MLPBlock(nnx.Module):
  """Pre-norm residual MLP block: x + W2 gelu(W1 norm(x))."""

  def __init__(self, embed: int, mlp: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(embed, rngs=rngs)
    self.up = nnx.Linear(embed, mlp, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(mlp, embed, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    h = nnx.spmd.constrain(jax.nn.gelu(self.up(self.norm(x))), ("batch", "mlp"))
    return x + self.down(h)


class MLPRegressor(nnx.Module):
  """In-projection, residual MLP blocks, head (the former spmdnnx.train model)."""

  def __init__(self, in_features: int, *, embed: int, mlp: int, num_layers: int,
               out_features: int, rngs: nnx.Rngs):
    self.embed = nnx.Linear(in_features, embed, kernel_axes=(None, "embed"), rngs=rngs)
    self.blocks = nnx.List([MLPBlock(embed, mlp, rngs=rngs) for _ in range(num_layers)])
    self.head = nnx.Linear(embed, out_features, kernel_axes=("embed", None), rngs=rngs)

  def __call__(self, x):
    x = nnx.spmd.constrain(self.embed(x), ("batch", "embed"))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def mse(pred, target):
  return jnp.mean((pred - target) ** 2)



def make_model(seed: int = 0, *, embed: int = 8, mlp: int = 16, layers: int = 2):
  return MLPRegressor(4, embed=embed, mlp=mlp, num_layers=layers, out_features=2,
                      rngs=nnx.Rngs(seed))


def make_optimizer(model):
  return nnx.Optimizer(model, optax.adamw(1e-2))


def batch(i: int):
  rng = np.random.default_rng(i)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  return x, np.tanh(x[:, :2]).astype(np.float32)


def train_steps(model, optimizer, start: int, n: int) -> list[float]:
  """n steps on deterministic batches start..start+n-1; returns the losses."""

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  for i in range(start, start + n):
    x, y = batch(i)
    ctx = nnx.current_context()
    if ctx is not None and ctx.mesh is not None:
      x, y = nnx.shard_batch((x, y))
    losses.append(float(step(model, optimizer, x, y)))  # float() bounds steps in flight
  return losses


def host_values(obj) -> dict:
  """{path: numpy array} of every leaf (keys as raw key data)."""
  out = {}
  for path, leaf in nnx.state(obj).flat_state():
    v = leaf.value
    if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
      v = jax.random.key_data(v)
    out[path] = np.asarray(v)
  return out


def assert_same_values(a: dict, b: dict) -> None:
  assert sorted(a, key=str) == sorted(b, key=str)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def auto_mesh(**degrees):
  return nnx.make_mesh(nnx.MeshConfig(**degrees))
