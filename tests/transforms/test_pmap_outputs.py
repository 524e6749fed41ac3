"""pmap returning graph objects (create patterns), out_axes per Variable, static results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Counted(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(2, 3, rngs=rngs)
    self.count = nnx.BatchStat(jnp.array(0))

  def __call__(self, x):
    self.count[...] += 1
    return self.lin(x)


def test_create_returns_a_module_stacked_on_axis_0():
  make = nnx.pmap(lambda x: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), axis_size=2)
  m = make(jnp.zeros(2))
  ref = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  assert m.kernel.shape == (2, 2, 3) and m.bias.shape == (2, 3)
  np.testing.assert_allclose(m.kernel[...][1], ref.kernel[...])


@pytest.mark.parametrize("kind", ["state_axes", "prefix"])
def test_out_axes_per_variable(kind):
  if kind == "state_axes":
    axes = nnx.StateAxes({nnx.Param: 0, ...: None})
  else:
    axes = nnx.prefix(nnx.eval_shape(lambda: Counted(nnx.Rngs(0))),
                      {nnx.Param: 0, ...: None})
  graph_updates = kind == "state_axes"
  make = nnx.pmap(lambda x: Counted(nnx.Rngs(0)), out_axes=axes, axis_size=2,
                  graph_updates=graph_updates)
  m = make(jnp.zeros(2))
  assert m.lin.kernel.shape == (2, 2, 3)
  assert m.count.shape == ()
  y = nnx.pmap(lambda m, x: m(x), in_axes=(axes, 0), axis_size=2,
               graph_updates=graph_updates)(m, jnp.ones((2, 1, 2)))
  assert y.shape == (2, 1, 3)
  assert int(m.count[...]) == 1


def test_tree_mode_split_state_and_graphdef_come_out():
  def create(x):
    graphdef, params, rest = nnx.split(Counted(nnx.Rngs(0)), nnx.Param, ...)
    return graphdef, params, rest

  graphdef, params, rest = nnx.pmap(create, out_axes=(None, 0, None), axis_size=2,
                                    graph=False)(jnp.zeros(2))
  assert params["lin"]["kernel"].shape == (2, 2, 3)
  assert rest["count"].shape == ()
  y = nnx.pmap(lambda p, r, x: nnx.merge(graphdef, p, r)(x), in_axes=(0, None, 0),
               axis_size=2, graph=False)(params, rest, jnp.ones((2, 1, 2)))
  ref = Counted(nnx.Rngs(0))(jnp.ones((1, 2)))
  np.testing.assert_allclose(y[1], ref, rtol=1e-6)


def test_int_out_axes_moves_the_mapped_axis_like_jax():
  f = lambda x: jnp.stack([x, 2 * x])
  x = jnp.arange(2.0)
  ours = nnx.pmap(f, out_axes=1, axis_size=2)(x)
  np.testing.assert_array_equal(ours, jax.pmap(f, out_axes=1)(x))


def test_returning_an_input_without_updates_is_refused():
  m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError, match="returned input argument node #0"):
    nnx.pmap(lambda m, x: m, in_axes=(None, 0), axis_size=1, graph_updates=False)(
        m, jnp.zeros(1))


def test_state_axes_out_axes_for_an_array():
  with pytest.raises(errors.TransformError, match="not a graph object created inside"):
    nnx.pmap(lambda x: x, out_axes=nnx.StateAxes({...: 0}), axis_size=2)(jnp.zeros(2))


def test_out_axes_of_another_structure():
  with pytest.raises(errors.TransformError, match=r"out_axes at output has structure"):
    nnx.pmap(lambda x: (x, x), out_axes=(0, 0, 0), axis_size=2)(jnp.zeros(2))


def test_prefix_in_axes_without_an_entry_is_an_error_not_a_silent_default():
  m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  axes = nnx.prefix(nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0)), lambda p, v: None)
  with pytest.raises(errors.TransformError, match="in_axes State has no entry for bias"):
    nnx.pmap(lambda m: m.kernel[...], in_axes=(axes,), axis_size=1)(m)


def test_out_axes_prefix_without_an_entry():
  axes = nnx.prefix(nnx.eval_shape(lambda: nnx.Linear(2, 3, use_bias=False,
                                                      rngs=nnx.Rngs(0))), lambda p, v: 0)
  with pytest.raises(errors.TransformError, match="out_axes State has no entry for bias"):
    nnx.pmap(lambda x: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), out_axes=axes,
             axis_size=1)(jnp.zeros(1))


def test_out_axes_state_axes_without_a_catch_all():
  with pytest.raises(errors.TransformError, match="no filter matches the state at count"):
    nnx.pmap(lambda x: Counted(nnx.Rngs(0)), out_axes=nnx.StateAxes({nnx.Param: 0}),
             axis_size=1)(jnp.zeros(1))
