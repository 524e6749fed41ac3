"""Tests for spmdnnx._transforms.scan: Flax parity (trace reuse, sow, batched keys)."""

import functools

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


class Summer(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.full((2,), 2.0, jnp.float32))

  def __call__(self, c, x):
    y = c + self.w * x
    self.sow(nnx.Intermediate, "y", y)
    return y, None


def test_sow_into_capture_is_stacked_per_step():
  m = Summer()

  def run(m, c, xs):
    axes = nnx.StateAxes({nnx.Intermediate: 0, ...: None})
    return nnx.scan(lambda m, c, x: m(c, x), in_axes=(axes, nnx.Carry, 0),
                    out_axes=(nnx.Carry, 0))(m, c, xs)

  (c, _), inter = nnx.capture(run, nnx.Intermediate)(m, jnp.zeros((2,)), jnp.ones((3, 2)))
  np.testing.assert_allclose(c, [6.0, 6.0])
  (ys,) = inter["y"].value
  np.testing.assert_allclose(ys, [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]])
  assert "__captures__" not in vars(m)


@pytest.mark.parametrize("graph", [True, False])
def test_prefix_state_as_scan_axes(graph):
  # A State of axes from nnx.prefix gives each Variable its own spec.
  m = Summer()
  m.w = nnx.Param(jnp.asarray([[1.0, 1.0], [10.0, 10.0]], jnp.float32))
  m.n = nnx.BatchStat(jnp.zeros((), jnp.float32))
  axes = nnx.prefix(m, {nnx.Param: 0, ...: None}, graph=graph)

  @nnx.scan(in_axes=(axes, nnx.Carry), out_axes=nnx.Carry, graph=graph,
            graph_updates=False)
  def f(m, c):
    m.n[...] = m.n + 1.0
    return c + m.w

  np.testing.assert_allclose(f(m, jnp.zeros((2,))), [11.0, 11.0])
  assert float(m.n.value) == 2.0
  assert m.w.shape == (2, 2)


def test_prefix_state_missing_a_variable_is_an_error():
  m = Summer()
  axes = nnx.prefix(m, {...: None})
  m.extra = nnx.BatchStat(jnp.zeros(()))  # not in the prefix

  @nnx.scan(in_axes=(axes, nnx.Carry), out_axes=nnx.Carry, length=2)
  def f(m, c):
    return c

  with pytest.raises(nnx.errors.TransformError, match="do not cover 1 state leaves: extra"):
    f(m, jnp.zeros(()))


def test_tree_mode_carry_object_comes_back_new_with_shared_variables():
  class Box(nnx.Pytree):
    def __init__(self):
      self.total = jnp.zeros((), jnp.float32)
      self.count = nnx.BatchStat(jnp.zeros((), jnp.float32))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph=False,
            graph_updates=False)
  def f(box, x):
    box.total = box.total + x
    box.count[...] = box.count + 1.0
    return box

  box = Box()
  out = f(box, jnp.arange(4.0))
  assert out is not box and out.count is box.count
  assert float(out.total) == 6.0 and float(box.count.value) == 4.0

  # Returned from a tree-mode jit (which refuses returning an input object).
  @nnx.jit(graph=False, graph_updates=False)
  def g(box, xs):
    return f(box, xs)

  assert float(g(Box(), jnp.arange(3.0)).total) == 3.0


@pytest.mark.parametrize("graph", [True, False])
def test_with_rngs_broadcast_keys_scanned_by_prefix(graph):
  # Every step gets one key of the broadcast batch: the same mask each step.
  drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))
  axes = nnx.prefix(drop, {"dropout": 0, ...: None}, graph=graph)

  @nnx.with_rngs(broadcast={"dropout": 3}, graph=graph, graph_updates=False)
  @nnx.scan(in_axes=(axes, 0), out_axes=0, graph=graph, graph_updates=False)
  def f(d, x):
    return d(x)

  masks = f(drop, jnp.ones((3, 32))) != 0
  assert masks.shape == (3, 32)
  assert bool((masks[0] == masks[1]).all()) and bool((masks[1] == masks[2]).all())
  assert 0 < int(masks[0].sum()) < 32


@pytest.mark.parametrize("graph", [True, False])
def test_split_keys_scanned_by_prefix_differ_per_step(graph):
  rngs = nnx.Rngs(params=0).split({"params": 3})
  axes = nnx.prefix(rngs, {...: 0}, graph=graph)

  @nnx.scan(in_axes=(axes,), out_axes=0, graph=graph, graph_updates=False)
  def f(r):
    return jax.random.key_data(r.params())

  keys = f(rngs)
  assert keys.shape[0] == 3
  assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 3


def test_step_closing_over_a_module_sees_its_current_values():
  # A step that reads a Module from its closure is traced again on each
  # call: reusing the trace would silently keep the old weights.
  m = Summer()

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def f(c, x):
    return c + m.w * x

  np.testing.assert_allclose(f(jnp.zeros((2,)), jnp.ones((3, 2))), [6.0, 6.0])
  m.w[...] = jnp.full((2,), 5.0, jnp.float32)
  np.testing.assert_allclose(f(jnp.zeros((2,)), jnp.ones((3, 2))), [15.0, 15.0])

  w = jnp.ones((2,), jnp.float32)
  g = nnx.scan(functools.partial(lambda w, c, x: c + w * x, w), in_axes=(nnx.Carry, 0),
               out_axes=nnx.Carry)
  np.testing.assert_allclose(g(jnp.zeros((2,)), jnp.ones((3, 2))), [3.0, 3.0])


_GLOBAL_MODEL = None


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _global_step(c, x):
  return c + _GLOBAL_MODEL.w * x


def test_step_reading_a_module_global_sees_its_current_values():
  global _GLOBAL_MODEL
  _GLOBAL_MODEL = Summer()
  np.testing.assert_allclose(_global_step(jnp.zeros((2,)), jnp.ones((3, 2))), [6.0, 6.0])
  _GLOBAL_MODEL.w[...] = jnp.full((2,), 5.0, jnp.float32)
  np.testing.assert_allclose(_global_step(jnp.zeros((2,)), jnp.ones((3, 2))), [15.0, 15.0])
