"""Small hand-written Modules shared by the transform tests."""

import jax
import jax.numpy as jnp

import spmdnnx as nnx


class Count(nnx.Variable):
  pass


class Linear(nnx.Module):
  """x @ w + b with logical axes ('embed', 'mlp') / ('mlp',)."""

  def __init__(self, din, dout, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) / din,
                       logical_axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.zeros(dout), logical_axes=("mlp",))

  def __call__(self, x):
    return x @ self.w.value + self.b.value


class Counter(nnx.Module):

  def __init__(self):
    self.count = Count(jnp.array(0))

  def __call__(self, x=None):
    self.count += 1
    return x


class RunningMean(nnx.Module):
  """BatchNorm-style running statistic plus a scale parameter."""

  def __init__(self, n, momentum=0.5):
    self.scale = nnx.Param(jnp.ones(n), logical_axes=("mlp",))
    self.mean = nnx.BatchStat(jnp.zeros(n), logical_axes=("mlp",))
    self.momentum = momentum

  def __call__(self, x):
    m = self.momentum
    self.mean.value = m * self.mean.value + (1 - m) * x.mean(axis=0)
    return (x - self.mean.value) * self.scale.value


class Drop(nnx.Module):
  """Dropout-like: draws a fresh key from `rngs.dropout` on every call."""

  def __init__(self, rate, *, rngs):
    self.rate = rate
    self.rngs = rngs

  def __call__(self, x):
    keep = jax.random.bernoulli(self.rngs.dropout(), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class Block(nnx.Module):
  """Residual MLP block: x + relu(x @ w1) @ w2."""

  def __init__(self, embed, mlp, *, rngs):
    self.up = Linear(embed, mlp, rngs=rngs)
    self.down = Linear(mlp, embed, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.relu(self.up(x)))


def close(a, b, tol=1e-5):
  return bool(jnp.allclose(a, b, atol=tol, rtol=tol))
