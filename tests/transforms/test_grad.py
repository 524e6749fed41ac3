"""Tests for spmdnnx._transforms.grad: grad / value_and_grad over graph objects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Scale(nnx.Variable):
  """A user Variable type that is trainable only when asked for."""


class Model(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.array([[1.0, -2.0], [0.5, 3.0]]), logical_axes=("in", "out"))
    self.b = nnx.Param(jnp.array([0.1, -0.1]))
    self.scale = Scale(jnp.array(2.0))
    self.mean = nnx.BatchStat(jnp.zeros(2))
    self.count = nnx.Variable(jnp.array(0))

  def __call__(self, x):
    h = x @ self.w + self.b
    self.mean.value = 0.9 * self.mean.value + 0.1 * h.mean(0)
    self.count += 1
    return h * self.scale


X = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 1.0]])
Y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def loss_fn(m, x, y):
  return ((m(x) - y) ** 2).mean()


def pure_loss(w, b, scale, x, y):
  return ((((x @ w) + b) * scale - y) ** 2).mean()


def test_grad_matches_jax_grad_on_pure_function():
  m = Model()
  grads = nnx.grad(loss_fn)(m, X, Y)
  assert isinstance(grads, nnx.State)
  assert [p for p, _ in grads.flat_state()] == [("b",), ("w",)]  # Params only
  gw, gb = jax.grad(pure_loss, argnums=(0, 1))(
      jnp.array([[1.0, -2.0], [0.5, 3.0]]), jnp.array([0.1, -0.1]), 2.0, X, Y)
  np.testing.assert_allclose(grads["w"].value, gw, rtol=1e-6)
  np.testing.assert_allclose(grads["b"].value, gb, rtol=1e-6)
  assert type(grads["w"]) is nnx.Param
  assert grads["w"].logical_axes == ("in", "out")


def test_value_and_grad():
  m = Model()
  expected = pure_loss(m.w.value, m.b.value, 2.0, X, Y)
  loss, grads = nnx.value_and_grad(loss_fn)(m, X, Y)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert set(grads) == {"w", "b"}


def test_wrt_filter():
  m = Model()
  grads = nnx.grad(loss_fn, wrt=Scale)(m, X, Y)
  assert [p for p, _ in grads.flat_state()] == [("scale",)]
  g = jax.grad(pure_loss, argnums=2)(m.w.value, m.b.value, jnp.array(2.0), X, Y)
  np.testing.assert_allclose(grads["scale"].value, g, rtol=1e-6)
  both = nnx.grad(loss_fn, wrt=(nnx.Param, Scale))(m, X, Y)
  assert set(both) == {"w", "b", "scale"}
  only_w = nnx.grad(loss_fn, wrt=nnx.PathContains("w"))(m, X, Y)
  assert set(only_w) == {"w"}


def test_diffstate():
  m = Model()
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, Scale))(m, X, Y)
  assert set(grads) == {"scale"}
  g_default = nnx.grad(loss_fn, argnums=nnx.DiffState(0))(m, X, Y)
  assert set(g_default) == {"w", "b"}


def test_argnums_plain_arrays_and_modules():
  m = Model()
  g_m, g_x = nnx.grad(loss_fn, argnums=(0, 1))(m, X, Y)
  assert set(g_m) == {"w", "b"}
  assert isinstance(g_x, jax.Array) and g_x.shape == X.shape
  expected = jax.grad(pure_loss, argnums=3)(m.w.value, m.b.value, 2.0, X, Y)
  np.testing.assert_allclose(g_x, expected, rtol=1e-6)
  g_y = nnx.grad(loss_fn, argnums=2)(m, X, Y)
  np.testing.assert_allclose(g_y, jax.grad(pure_loss, argnums=4)(m.w.value, m.b.value,
                                                                  2.0, X, Y), rtol=1e-6)


def test_grad_of_pure_function_like_jax():
  f = lambda x, y: (x * y).sum()  # noqa: E731
  np.testing.assert_allclose(nnx.grad(f)(jnp.ones(2), jnp.arange(2.0)), [0.0, 1.0])
  gx, gy = nnx.grad(f, argnums=(0, 1))(jnp.ones(2), jnp.arange(2.0))
  np.testing.assert_allclose(gy, [1.0, 1.0])
  v, g = nnx.value_and_grad(f, argnums=1)(jnp.ones(2), jnp.arange(2.0))
  assert float(v) == 1.0


def test_has_aux():
  m = Model()

  def f(m, x, y):
    out = m(x)
    return ((out - y) ** 2).mean(), {"out": out, "model": m}

  grads, aux = nnx.grad(f, has_aux=True)(m, X, Y)
  assert set(grads) == {"w", "b"}
  assert aux["out"].shape == (3, 2)
  assert aux["model"] is m  # an input module comes back as itself
  (loss, aux), grads = nnx.value_and_grad(f, has_aux=True)(m, X, Y)
  np.testing.assert_allclose(loss, ((aux["out"] - Y) ** 2).mean(), rtol=1e-6)


def test_has_aux_wrong_output_error():
  with pytest.raises(errors.TransformError,
                     match=r"grad\(.*<lambda>, has_aux=True\): the function must return a "
                     r"\(loss, aux\) pair, got a single array of shape \(\)"):
    nnx.grad(lambda m: m.b.value.sum(), has_aux=True)(Model())


def test_argnum_out_of_range_error():
  with pytest.raises(errors.TransformError,
                     match=r"grad\(.*loss_fn\): argnum 5 is out of range for 3 positional "
                     r"argument\(s\)"):
    nnx.grad(loss_fn, argnums=5)(Model(), X, Y)


def test_bad_argnums_entry_error():
  with pytest.raises(errors.TransformError,
                     match=r"grad: argnums entries must be ints or DiffState, got 'w'"):
    nnx.grad(loss_fn, argnums=("w",))


def test_container_of_modules_argument_gets_a_list_of_states():
  m = Model()
  g = nnx.grad(lambda ms, x, y: loss_fn(ms[0], x, y))([m], X, Y)
  assert isinstance(g, list) and isinstance(g[0], nnx.State)
  g_direct = nnx.grad(loss_fn)(Model(), X, Y)
  np.testing.assert_allclose(g[0]["w"][...], g_direct["w"][...], rtol=1e-6)


def test_state_updates_propagate():
  m = Model()
  h_mean = (X @ m.w.value + m.b.value).mean(0)
  nnx.grad(loss_fn)(m, X, Y)
  np.testing.assert_allclose(m.mean.value, 0.1 * h_mean, rtol=1e-6)
  assert int(m.count.value) == 1
  assert not isinstance(m.mean.value, jax.core.Tracer)
  nnx.value_and_grad(loss_fn)(m, X, Y)
  assert int(m.count.value) == 2
  # Params are not changed by taking gradients.
  np.testing.assert_array_equal(m.b.value, np.array([0.1, -0.1], np.float32))


def test_rngs_advance_through_grad():

  class Noisy(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))
      self.rngs = nnx.Rngs(dropout=0)

    def __call__(self):
      return (self.w * jax.random.normal(self.rngs.dropout(), (2,))).sum()

  m = Noisy()
  g1 = nnx.grad(lambda m: m())(m)
  g2 = nnx.grad(lambda m: m())(m)
  assert int(m.rngs.dropout.count.value) == 2
  assert not np.allclose(g1["w"].value, g2["w"].value)


def test_two_module_arguments_with_shared_submodule():

  class Wrapper(nnx.Module):

    def __init__(self, inner):
      self.inner = inner
      self.extra = nnx.Param(jnp.array(1.0))

  m = Model()
  w = Wrapper(m)

  def f(w, m):
    assert w.inner is m
    return loss_fn(m, X, Y) * w.extra

  g_w, g_m = nnx.grad(f, argnums=(0, 1))(w, m)
  # The shared model's Params belong to the first argument that reaches them.
  assert ("inner", "w") in [p for p, _ in g_w.flat_state()]
  assert ("extra",) in [p for p, _ in g_w.flat_state()]
  assert len(g_m.flat_state()) == 0
  assert int(m.count.value) == 1


def test_grad_inside_jit_matches():
  m1, m2 = Model(), Model()

  @nnx.jit
  def step(m):
    return nnx.grad(loss_fn)(m, X, Y)

  g_jit = step(m1)
  g_eager = nnx.grad(loss_fn)(m2, X, Y)
  np.testing.assert_allclose(g_jit["w"].value, g_eager["w"].value, rtol=1e-6)
  np.testing.assert_allclose(m1.mean.value, m2.mean.value, rtol=1e-6)
  assert int(m1.count.value) == 1


def test_decorator_form():

  @nnx.grad(wrt=Scale)
  def f(m):
    return m.scale.value ** 2

  assert float(f(Model())["scale"].value) == 4.0


def test_sgd_loop_reduces_loss():
  m = Model()
  first = float(loss_fn(nnx.clone(m), X, Y))
  for _ in range(20):
    grads = nnx.grad(loss_fn)(m, X, Y)
    params = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
  assert float(loss_fn(nnx.clone(m), X, Y)) < first
  assert m.w.logical_axes == ("in", "out")
