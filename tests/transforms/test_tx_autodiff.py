"""grad in tree mode and over States of Variables; vjp, jvp, checkify,
make_jaxpr, pmap; remat / eval_shape / shard_map without graph updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify as jax_checkify

import spmdnnx as nnx
from spmdnnx import errors


class Lin(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]))
    self.count = nnx.BatchStat(jnp.array(0))


def loss(m, x):
  m.count[...] += 1
  return jnp.sum(m.w[...] * x)


@pytest.mark.parametrize("graph,updates", [(True, False), (False, False)])
def test_grad_without_updates_returns_an_object_of_the_argument_type(graph, updates):
  m = Lin()
  g = nnx.grad(loss, graph=graph, graph_updates=updates)(m, jnp.array([3.0, 4.0]))
  assert type(g) is Lin
  np.testing.assert_allclose(g.w[...], [3.0, 4.0])
  assert int(m.count[...]) == 1   # the update still flows back


def test_grad_in_graph_mode_returns_a_state():
  g = nnx.grad(loss)(Lin(), jnp.array([3.0, 4.0]))
  assert isinstance(g, nnx.State)
  np.testing.assert_allclose(g["w"].value, [3.0, 4.0])


def test_tree_mode_grad_refuses_shared_variables():
  m = Lin()
  m.alias = m.w
  with pytest.raises(errors.TransformError, match=r"Duplicate Param found at paths"):
    nnx.grad(lambda m: jnp.sum(m.w[...]), graph=False)(m)


def test_grad_over_a_state_of_variables_keeps_types_and_updates():
  m = Lin()
  _, params, rest = nnx.split(m, nnx.Param, ...)

  def f(params, rest):
    return jnp.sum(params["w"][...] ** 2)

  g = nnx.grad(f)(params, rest)
  assert isinstance(g, nnx.State) and type(g["w"]) is nnx.Param
  np.testing.assert_allclose(g["w"][...], [2.0, 4.0])
  nnx.update(m, g)
  np.testing.assert_allclose(m.w[...], [2.0, 4.0])


def test_vjp_gives_object_cotangents_and_propagates_state():
  m, x = Lin(), jnp.array([3.0, 4.0])
  out, pullback = nnx.vjp(loss, m, x)
  assert float(out) == 11.0 and int(m.count[...]) == 1
  m_ct, x_ct = pullback(jnp.ones(()))
  assert type(m_ct) is Lin
  np.testing.assert_allclose(m_ct.w[...], [3.0, 4.0])
  np.testing.assert_allclose(x_ct, [1.0, 2.0])


def test_vjp_decorator_and_aux():
  @nnx.vjp(has_aux=True)
  def f(x):
    return jnp.sum(x ** 2), {"x": x}

  out, pullback, aux = f(jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(pullback(jnp.ones(()))[0], [2.0, 4.0])
  np.testing.assert_allclose(aux["x"], [1.0, 2.0])


def test_jvp_with_an_object_tangent():
  m, t = Lin(), Lin()
  t.w[...] = jnp.array([1.0, 0.0])
  out, t_out = nnx.jvp(lambda m: jnp.sum(m.w[...] ** 2), (m,), (t,))
  assert float(out) == 5.0 and float(t_out) == 2.0


def test_jvp_tangent_structure_mismatch_is_an_error():
  with pytest.raises(errors.TransformError, match="tangents must have the structure"):
    nnx.jvp(lambda m: jnp.sum(m.w[...]), (Lin(),), (jnp.ones(2),))


def test_checkify_returns_the_error_and_updates():
  def f(m, x):
    m.count[...] += 1
    jax_checkify.check(jnp.all(x > 0), "x must be positive")
    return x

  m = Lin()
  err, out = nnx.checkify(f)(m, jnp.array([-1.0]))
  assert "x must be positive" in err.get()
  assert int(m.count[...]) == 1


def test_make_jaxpr_needs_graph_updates_false_and_leaves_args_alone():
  m = Lin()
  with pytest.raises(errors.TransformError, match="does not support graph_updates=True"):
    nnx.make_jaxpr(loss)(m, jnp.ones(2))
  jaxpr = nnx.make_jaxpr(loss, graph_updates=False)(m, jnp.ones(2))
  assert "mul" in str(jaxpr) and int(m.count[...]) == 0


def test_pmap_broadcast_state_updates_flow_back():
  m = Lin()
  y = nnx.pmap(loss, in_axes=(None, 0), axis_size=1)(m, jnp.ones((1, 2)))
  np.testing.assert_allclose(y, [3.0])
  assert int(m.count[...]) == 1
  with pytest.raises(errors.TransformError, match="must be an int, None, a StateAxes"):
    nnx.pmap(loss, in_axes=({"w": 0}, 0), axis_size=1)(m, jnp.ones((1, 2)))


def test_pmap_per_variable_axes_from_state_axes_and_prefix():
  class Ens(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((1, 2)))
      self.b = nnx.Param(jnp.array([10.0]))

  m = Ens()
  for axes in (nnx.StateAxes({nnx.PathContains("w"): 0, ...: None}),
               nnx.prefix(m, {nnx.PathContains("w"): 0, ...: None})):
    y = nnx.pmap(lambda m, x: m.w[...] @ x + m.b[...], in_axes=(axes, None),
                 axis_size=1)(m, jnp.ones(2))
    np.testing.assert_allclose(y, [[12.0]])


@pytest.mark.parametrize("graph", [True, False])
def test_eval_shape_without_updates_refuses_returned_inputs(graph):
  v = nnx.Param(jnp.ones(2))
  with pytest.raises(errors.TransformError, match="does not support Variable aliasing"):
    nnx.eval_shape(lambda v: v, v, graph=graph, graph_updates=False)
  out = nnx.eval_shape(lambda v: v[...] * 2, v, graph=graph, graph_updates=False)
  assert out.shape == (2,)


def test_remat_without_updates_refuses_structure_changes():
  def f(m):
    m.extra = nnx.Param(jnp.zeros(()))
    return jnp.sum(m.w[...])

  m = Lin()
  with pytest.raises(errors.TransformError, match="changed the structure"):
    nnx.remat(f, graph_updates=False)(m)
  assert float(nnx.remat(lambda m: jnp.sum(m.w[...]), graph=False)(m)) == 3.0
