"""grad over pytrees holding Variables, Modules, nnx.List / nnx.Dict, in every mode."""

import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Two(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]))
    self.stat = nnx.BatchStat(jnp.array(3.0))


def total(d):
  return d["a"][0][...] + 2.0 * d["a"][1][...] + d["b"][...]


@pytest.mark.parametrize("updates", [True, False])
def test_variables_in_a_dict_get_their_real_gradients(updates):
  p1, p2 = nnx.Param(10.0), nnx.Param(20.0)   # Python floats: still differentiated
  d = {"a": [p1, p2], "b": p1}
  g = nnx.grad(total, graph_updates=updates)(d)
  assert type(g) is dict and type(g["a"][0]) is nnx.Param
  assert float(g["a"][0][...]) == 2.0   # reached twice: both uses add up
  assert float(g["a"][1][...]) == 2.0
  if updates:
    assert isinstance(g["b"], nnx.State) and len(g["b"].flat_state()) == 0
  else:
    assert float(g["b"][...]) == 2.0
  assert p1[...] == 10.0 and p2[...] == 20.0   # the inputs are untouched


def test_gradient_of_a_dict_of_variables_updates_the_originals():
  p1, p2 = nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(5.0))
  d = {"a": [p1, p2], "b": p1}
  nnx.update(d, nnx.state(nnx.grad(total)(d)))
  assert d["a"][0] is d["b"] is p1
  assert float(p1[...]) == 2.0 and float(p2[...]) == 2.0


def test_nnx_dict_argument_gives_a_state_filtered_by_param():
  d = nnx.Dict(a=nnx.List([nnx.Param(jnp.array(1.0)), nnx.BatchStat(jnp.array(2.0))]),
               b=nnx.Param(jnp.array(3.0)), c=7)
  g = nnx.grad(lambda d: d.a[0][...] * d.b[...] + d.a[1][...])(d)
  assert isinstance(g, nnx.State)
  assert sorted(p for p, _ in g.flat_state()) == [("a", 0), ("b",)]
  assert float(g["a"][0][...]) == 3.0 and float(g["b"][...]) == 1.0
  only_stats = nnx.grad(lambda d: d.a[0][...] * d.b[...] + 4.0 * d.a[1][...],
                        argnums=nnx.DiffState(0, nnx.BatchStat))(d)
  assert [p for p, _ in only_stats.flat_state()] == [("a", 1)]
  assert type(only_stats["a"][1]) is nnx.BatchStat
  assert float(only_stats["a"][1][...]) == 4.0


@pytest.mark.parametrize("graph", [True, False])
def test_without_updates_every_inexact_variable_is_differentiated(graph):
  d = nnx.Dict(a=nnx.List([nnx.Param(jnp.array(1.0)), nnx.BatchStat(jnp.array(2.0))]),
               b=nnx.Param(jnp.array(3.0)))
  g = nnx.grad(lambda d: d.a[0][...] * d.b[...] + 4.0 * d.a[1][...],
               graph=graph, graph_updates=False)(d)
  assert type(g) is nnx.Dict and type(g.a[1]) is nnx.BatchStat
  assert [float(g.a[0][...]), float(g.a[1][...]), float(g.b[...])] == [3.0, 4.0, 1.0]


def test_without_updates_a_shared_variable_holds_its_total_gradient_everywhere():
  p = nnx.Param(jnp.array(1.0))
  d = nnx.Dict(x=p, y=p)
  g = nnx.grad(lambda d: 3.0 * d.x[...] + d.y[...], graph_updates=False)(d)
  assert g.x is g.y and float(g.x[...]) == 4.0


def test_modules_in_lists_with_diffstates_and_aux():
  m1, m2 = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(2, 3, rngs=nnx.Rngs(1))

  def f(l1, l2):
    return jnp.sum(l1[0].kernel[...] * l2[0].kernel[...]) + jnp.sum(l2[0].bias[...]), "aux"

  argnums = (nnx.DiffState(0, nnx.PathContains("kernel")),
             nnx.DiffState(1, nnx.PathContains("bias")))
  (loss, aux), (g1, g2) = nnx.value_and_grad(f, argnums=argnums, has_aux=True)([m1], [m2])
  assert aux == "aux" and loss.shape == ()
  assert [p for p, _ in g1[0].flat_state()] == [("kernel",)]
  assert [p for p, _ in g2[0].flat_state()] == [("bias",)]
  np.testing.assert_allclose(g1[0]["kernel"][...], m2.kernel[...])
  np.testing.assert_allclose(g2[0]["bias"][...], jnp.ones(3))


def test_mixed_pytree_argument_gets_a_state_and_an_array_gradient():
  m = Two()
  g_m, g_x = nnx.grad(lambda t: jnp.sum(t[0].w[...] * t[1]))((m, jnp.array([3.0, 4.0])))
  np.testing.assert_allclose(g_m["w"][...], [3.0, 4.0])
  np.testing.assert_allclose(g_x, [1.0, 2.0])


def test_an_object_passed_twice_is_differentiated_at_its_first_place():
  m = Two()
  g1, g2 = nnx.grad(lambda a, b: jnp.sum(a.w[...]) + jnp.sum(b.w[...]), argnums=(0, 1))(m, m)
  np.testing.assert_allclose(g1["w"][...], [2.0, 2.0])
  assert len(g2.flat_state()) == 0


def test_integer_variables_of_a_state_are_left_out():
  count = nnx.Variable(jnp.array(0))
  s = nnx.State({"w": nnx.Param(jnp.array(2.0)), "count": count})
  g = nnx.grad(lambda s: s["w"][...] ** 2)(s)
  assert [p for p, _ in g.flat_state()] == [("w",)]


def test_repeated_argnum_error():
  with pytest.raises(errors.TransformError, match=r"argnum 0 is repeated in argnums"):
    nnx.grad(lambda m: 0.0, argnums=(0, nnx.DiffState(0, nnx.Param)))


def test_diffstate_without_graph_updates_error():
  with pytest.raises(errors.TransformError, match=r"cannot contain `DiffState` objects"):
    nnx.grad(lambda m: 0.0, argnums=nnx.DiffState(0, nnx.Param), graph_updates=False)


def test_graph_node_as_argnums_prefix_error():
  with pytest.raises(errors.TransformError,
                     match=r"Dict at \(top level\).*Graph nodes are not allowed as prefixes"):
    nnx.grad(lambda m: 0.0, argnums=nnx.Dict(a=nnx.Param(1.0)))


class Pair(nnx.Module):

  def __init__(self):
    self.a = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(1, 1, rngs=nnx.Rngs(1))


def swap_and_count(m):
  m.a, m.b = m.b, m.a
  m.a.bias[...] += 1.0   # that is b's bias
  return jnp.sum(m.a.kernel[...])


def test_objects_moved_inside_grad_move_outside():
  m = Pair()
  a, b = m.a, m.b
  g = nnx.grad(swap_and_count)(m)
  assert m.a is b and m.b is a
  assert float(b.bias[...][0]) == 1.0 and float(a.bias[...][0]) == 0.0
  # The gradient names the Variables by their paths in the input (b was at "b").
  assert float(g["a"]["kernel"][...][0, 0]) == 0.0 and float(g["b"]["kernel"][...][0, 0]) == 1.0


def test_without_updates_moves_inside_grad_are_dropped_and_values_follow_identity():
  m = Pair()
  a, b = m.a, m.b
  nnx.grad(swap_and_count, graph_updates=False)(m)
  assert m.a is a and m.b is b
  assert float(b.bias[...][0]) == 1.0 and float(a.bias[...][0]) == 0.0


def test_no_updates_refuses_an_object_shared_by_diff_and_nondiff_arguments():
  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(errors.TransformError, match=r"Inconsistent aliasing detected.*argument 0 "
                     r"at <root> and argument 1 at <root>"):
    nnx.grad(lambda a, b: a[...] + b[...], argnums=0, graph_updates=False)(v, v)
  m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError, match=r"argument 0 at kernel and argument 1 at <root>"):
    nnx.grad(lambda a, b: jnp.sum(a(jnp.ones(2))) + jnp.sum(b[...]), argnums=0,
             graph_updates=False)(m, m.kernel)
  # With updates the reference is shared: both reads are the one traced value (d v^2 = 2v).
  g = nnx.grad(lambda a, b: a[...] * b[...], argnums=0)(v, v)
  assert float(g[...]) == 2.0
  # Both differentiated, or a copy: no clash.
  g = nnx.grad(lambda a, b: a[...] + b[...], argnums=0, graph_updates=False)(v, nnx.clone(v))
  assert float(g[...]) == 1.0
