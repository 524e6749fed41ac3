"""jit: which objects are the same after a call (moves, List/Dict arguments, jax.Ref,
cached_partial)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Pair(nnx.Module):

  def __init__(self):
    self.a = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(2, 2, rngs=nnx.Rngs(1))


def test_swapped_submodules_keep_their_identity_and_values():
  traces = []

  @nnx.jit
  def swap(m):
    traces.append(1)
    m.a, m.b = m.b, m.a

  m = Pair()
  a, b = m.a, m.b
  a_kernel = np.asarray(a.kernel[...])
  swap(m)
  assert m.a is b and m.b is a
  np.testing.assert_array_equal(a.kernel[...], a_kernel)   # a kept its own values
  swap(m)
  assert m.a is a and m.b is b and len(traces) == 1


def test_swapped_variables_inside_a_pytree_argument():

  @nnx.jit
  def swap(tree):
    m = tree[0]["m"].m
    m.x, m.y = m.y, m.x

  m = nnx.Dict(x=nnx.Param(jnp.array(1.0)), y=nnx.Param(jnp.array(2.0)))
  holder = Pair()
  holder.m = m
  x, y = m.x, m.y
  swap(({"m": holder},))
  assert m.x is y and m.y is x and float(x[...]) == 1.0


def test_without_graph_updates_moves_are_dropped_and_values_follow_identity():

  @nnx.jit(graph_updates=False)
  def swap(m):
    m.a, m.b = m.b, m.a
    m.a.bias[...] += 1.0   # that is b's bias

  m = Pair()
  a, b = m.a, m.b
  swap(m)
  assert m.a is a and m.b is b
  np.testing.assert_array_equal(a.bias[...], jnp.zeros(2))
  np.testing.assert_array_equal(b.bias[...], jnp.ones(2))


def test_an_nnx_dict_argument_receives_new_items():

  @nnx.jit
  def f(d):
    d.a = 2
    return 1.0

  d = nnx.Dict(a=nnx.Param(jnp.array(1.0)))
  assert f(d) == 1.0 and d.a == 2

  @nnx.jit
  def g(d):
    d.w[...] += 1.0
    d.new = nnx.Param(jnp.array(5.0))

  d = nnx.Dict(w=nnx.Param(jnp.array(1.0)))
  w = d.w
  g(d)
  assert d.w is w and float(w[...]) == 2.0 and float(d.new[...]) == 5.0


def test_an_nnx_list_argument_receives_appended_modules():

  @nnx.jit
  def f(layers):
    layers.append(nnx.Linear(1, 2, rngs=nnx.Rngs(1)))
    return layers[0]

  first = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
  layers = nnx.List([first])
  assert f(layers) is first
  assert len(layers) == 2 and layers[1].kernel.shape == (1, 2)


def test_mutable_array_references_in_and_out():

  @nnx.jit
  def f(r, tree):
    r[...] += 1.0
    tree["r"][...] *= 2.0
    return jax.new_ref(jnp.array(10.0)), r, [tree["r"]]

  r, r2 = jax.new_ref(jnp.array(1.0)), jax.new_ref(jnp.array(3.0))
  new, same, (same2,) = f(r, {"r": r2, "m": Pair()})
  assert same is r and same2 is r2 and isinstance(new, jax.Ref)
  assert float(r[...]) == 2.0 and float(r2[...]) == 6.0 and float(new[...]) == 10.0
  f(r, {"r": r2, "m": Pair()})
  assert float(r[...]) == 3.0


def test_cached_partial_passes_clones_sharing_the_variables():
  m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

  @nnx.jit
  def f(cached, m):
    assert cached is not m and cached.kernel is m.kernel
    cached.bias[...] += 1.0
    return cached

  step = nnx.cached_partial(f, m)
  c1 = step(m)
  assert c1 is not m and c1.kernel is m.kernel and step(m) is c1
  np.testing.assert_array_equal(m.bias[...], 2.0 * jnp.ones(3))


def test_cached_partial_structure_change_error():

  @nnx.jit
  def f(m, x):
    m.extra = nnx.Param(x)

  step = nnx.cached_partial(f, nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
  with pytest.raises(errors.TransformError,
                     match=r"structure of a node added to cached_partial was mutated"):
    step(jnp.ones(1))


def test_cached_partial_needs_graph_updates_error():
  with pytest.raises(errors.TransformError,
                     match=r"cached_partial is a graph-mode-only API and requires "
                     r"graph_updates=True \(got graph=True, graph_updates=False\)"):
    nnx.cached_partial(lambda m: m, nnx.Linear(1, 1, rngs=nnx.Rngs(0)), graph_updates=False)


def test_an_nnx_dict_as_in_shardings_prefix_error():
  with pytest.raises(errors.TransformError,
                     match=r"graph node of type Dict at \(top level\) in `in_shardings`.*"
                     r"Graph nodes are not allowed as prefixes"):
    nnx.jit(lambda x: x, in_shardings=nnx.Dict(a=nnx.Param(1.0)))
