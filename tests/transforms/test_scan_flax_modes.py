"""Tests for spmdnnx._transforms.scan: Flax parity (trace reuse, sow, batched keys)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx


@pytest.mark.parametrize("graph_updates", [True, False])
def test_step_traced_once_across_calls(graph_updates):
  traces = []

  @nnx.scan(graph_updates=graph_updates)
  def f(total, x):
    traces.append(1)
    return total + x, 2 * x

  for k in range(3):
    total, ys = f(jnp.float32(k), jnp.arange(4.0))
    assert float(total) == k + 6.0
    np.testing.assert_allclose(ys, [0.0, 2.0, 4.0, 6.0])
  assert len(traces) == 1
  # New shapes are a new trace; going back to the old ones is not.
  f(jnp.float32(0), jnp.arange(5.0))
  f(jnp.float32(0), jnp.arange(4.0))
  assert len(traces) == 2


@pytest.mark.parametrize("graph_updates", [True, False])
def test_reused_trace_reads_this_calls_state(graph_updates):
  traces = []

  class Acc(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3,)))
      self.n = nnx.BatchStat(jnp.zeros(()))

  @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
            graph_updates=graph_updates)
  def f(acc, c, x):
    traces.append(1)
    acc.n[...] = acc.n + 1.0
    return c + acc.w * x, acc.n[...]

  a, b = Acc(), Acc()
  b.w[...] = jnp.full((3,), 10.0, jnp.float32)
  c, ns = f(a, jnp.zeros((3,)), jnp.ones((2, 3)))
  np.testing.assert_allclose(c, [2.0, 2.0, 2.0])
  np.testing.assert_allclose(ns, [1.0, 2.0])
  c, ns = f(b, jnp.zeros((3,)), jnp.ones((2, 3)))
  np.testing.assert_allclose(c, [20.0, 20.0, 20.0])
  np.testing.assert_allclose(ns, [1.0, 2.0])
  a.w[...] = jnp.full((3,), 3.0, jnp.float32)
  c, ns = f(a, jnp.zeros((3,)), jnp.ones((2, 3)))
  np.testing.assert_allclose(c, [6.0, 6.0, 6.0])
  np.testing.assert_allclose(ns, [3.0, 4.0])
  assert (float(a.n.value), float(b.n.value)) == (4.0, 2.0)
  assert len(traces) == 1


def test_broadcast_array_argument_not_frozen_by_reuse():
  @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
  def f(c, scale, x):
    return c + scale * x, scale * x

  c1, _ = f(jnp.float32(0), jnp.float32(1), jnp.arange(3.0))
  c2, ys = f(jnp.float32(0), jnp.float32(2), jnp.arange(3.0))
  assert (float(c1), float(c2)) == (3.0, 6.0)
  np.testing.assert_allclose(ys, [0.0, 2.0, 4.0])


def test_trace_not_reused_across_enclosing_jit_traces():
  # Inside two different jit traces the step closes over different tracers:
  # reusing the first trace would leak them.
  holder = {}

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(c, x):
    return c + holder["v"] * x

  @jax.jit
  def g(v, xs, k):
    holder["v"] = v
    return step(jnp.float32(0), xs) + jnp.float32(k)

  # The static k forces a second jit trace with the same scan operands.
  assert float(g(jnp.float32(1), jnp.arange(3.0), 0)) == 3.0
  assert float(g(jnp.float32(2), jnp.arange(3.0), 1)) == 7.0
