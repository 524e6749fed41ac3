"""Graph vs simple mode (graph=/graph_updates=) for vmap, scan, cond, switch and loops."""

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from tx_models import Counter

MODES = [(True, True), (True, False), (False, False)]


class Holder(nnx.Module):

  def __init__(self, n=3):
    self.w = nnx.Param(jnp.zeros((n, 2)))


class Wrap(nnx.Module):

  def __init__(self, x):
    self.x = x


@pytest.mark.parametrize("graph,updates", MODES)
def test_vmap_state_updates_flow_back_in_every_mode(graph, updates):
  c = Counter()
  f = nnx.vmap(lambda c, x: c(x) * 2, in_axes=(None, 0), graph=graph, graph_updates=updates)
  y = f(c, jnp.arange(4.0))
  assert y.tolist() == [0.0, 2.0, 4.0, 6.0]
  assert int(c.count.value) == 1


def test_simple_mode_keeps_structure_changes_inside():
  h = Holder()

  def add(h, x):
    h.extra = nnx.Param(x)
    h.w[...] = h.w[...] + 1.0
    return x

  nnx.vmap(add, in_axes=(0, 0), graph=False)(h, jnp.arange(3.0))
  assert not hasattr(h, "extra")
  assert float(h.w.value.sum()) == 6.0


def test_mode_resolved_from_set_graph_mode():
  h = Holder()
  with nnx.set_graph_mode(False):
    f = nnx.vmap(lambda a, b: None, in_axes=(0, 0))
  with pytest.raises(errors.TransformError, match=r"Duplicate Param[\s\S]*0/w\n  - 1/w"):
    f(h, h)


def test_graph_mode_inconsistent_aliasing_lists_paths():
  h = Holder()
  a, b = Wrap(h), Wrap(h)
  f = nnx.vmap(lambda a, b: None, in_axes=(0, 1))
  with pytest.raises(errors.TransformError,
                     match=r"Inconsistent aliasing detected[\s\S]*Param:\n  x/w: 0\n  x/w: 1"):
    f(a, b)
  # The same object with the same axis is fine.
  nnx.vmap(lambda a, b: None, in_axes=(0, 0))(a, b)


def test_simple_mode_returning_an_input_is_aliasing():
  f = nnx.vmap(lambda h: h, in_axes=0, out_axes=0, graph_updates=False)
  with pytest.raises(errors.TransformError, match=r"Duplicate Param[\s\S]*Variable aliasing"):
    f(Holder())


def test_graph_mode_returning_input_with_other_axis_is_inconsistent():
  f = nnx.vmap(lambda h: h, in_axes=0, out_axes=1)
  with pytest.raises(errors.TransformError, match="Inconsistent aliasing detected"):
    f(Holder())


def test_prefix_checks():
  with pytest.raises(errors.TransformError, match="cannot contain `StateAxes` objects"):
    nnx.vmap(lambda x: x, in_axes=nnx.StateAxes({...: 0}), graph=False)
  with pytest.raises(errors.TransformError, match="Graph nodes are not allowed as prefixes"):
    nnx.vmap(lambda x: x, in_axes=Holder())
  with pytest.raises(errors.TransformError, match="Variables prefixes are not supported"):
    nnx.scan(lambda x: x, in_axes=(nnx.Param(0),), out_axes=0)


def test_captured_module_returned_is_an_error():
  h = Holder()
  with pytest.raises(errors.TransformError, match="different trace level.*captured"):
    nnx.vmap(lambda x: h, in_axes=0, out_axes=0)(jnp.zeros(3))
  with pytest.raises(errors.TransformError, match="Cannot return captured"):
    nnx.vmap(lambda x: h, in_axes=0, out_axes=0, graph=False)(jnp.zeros(3))


def test_kwargs_bound_to_positions():
  f = nnx.vmap(lambda a, b: a * b, in_axes=(0, None))
  assert f(jnp.arange(3.0), b=2.0).tolist() == [0.0, 2.0, 4.0]


def test_state_axes_from_state_as_out_axes():
  state = nnx.state(Holder())
  state["w"] = 1
  f = nnx.vmap(lambda: Holder(), in_axes=(), out_axes=nnx.StateAxes(state), axis_size=4)
  h = f()
  assert h.w.shape == (3, 4, 2)
  with pytest.raises(errors.TransformError, match="no filter matches.*nope"):
    nnx.StateAxes(state).map_prefix(("nope",), None)


def test_transform_metadata_names_the_axis():
  @nnx.vmap(in_axes=0, out_axes=0, graph_updates=False)
  @nnx.transform_metadata(partition="experts")
  def make(key):
    return nnx.Param(jax.random.normal(key, (2,)), logical_axes=("embed",))

  p = make(jax.random.split(jax.random.key(0), 3))
  assert p.shape == (3, 2) and p.logical_axes == ("experts", "embed")
  # Distinct keys, distinct rows.
  assert not jnp.allclose(p.value[0], p.value[1])


@pytest.mark.parametrize("graph,updates", MODES)
def test_scan_modes_carry_module(graph, updates):
  c = Counter()
  f = nnx.scan(lambda c, x: (c, c(x) + 1.0), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
               graph=graph, graph_updates=updates)
  c2, ys = f(c, jnp.arange(3.0))
  # Tree mode returns the carry as a new pytree sharing the caller's Variables.
  assert (c2 is c) if graph else (c2 is not c and c2.count is c.count)
  assert int(c.count.value) == 3
  assert ys.tolist() == [1.0, 2.0, 3.0]


def test_scan_axis_errors_when_applied():
  with pytest.raises(errors.TransformError, match="Carry must be a top-level argument"):
    nnx.scan(lambda x: x, in_axes=({"a": nnx.Carry},), out_axes=nnx.Carry)
  with pytest.raises(errors.TransformError,
                     match=r"Cannot broadcast output state. Got StateAxes\(\{Ellipsis: None\}\)"):
    nnx.scan(lambda c, x: (c, x), in_axes=(nnx.Carry, 0),
             out_axes=(nnx.Carry, nnx.StateAxes({...: None})))
  f = nnx.scan(lambda a, b: a, in_axes=nnx.Carry, out_axes=nnx.Carry, length=2)
  with pytest.raises(errors.TransformError, match="When in_axes=Carry.*exactly one argument"):
    f(1.0, 2.0)


def test_scan_prefix_tree_in_axes():
  xs = {"a": jnp.arange(3.0), "b": jnp.array(10.0)}
  total, ys = nnx.scan(lambda c, x: (c + x["a"] + x["b"], c), in_axes=(nnx.Carry, {"a": 0, "b": None}),
                       out_axes=(nnx.Carry, 0), graph=False)(jnp.array(0.0), xs)
  assert float(total) == 33.0 and ys.tolist() == [0.0, 10.0, 21.0]


@pytest.mark.parametrize("graph,updates", [(True, False), (False, False)])
def test_scan_simple_mode_carry_identity(graph, updates):
  f = nnx.scan(lambda v, x: (nnx.Variable(v[...] + 1), x), graph=graph, graph_updates=updates)
  with pytest.raises(errors.TransformError,
                     match="scan Variable identity must be preserved across iterations"):
    f(nnx.Variable(jnp.array(0)), jnp.arange(3))


@pytest.mark.parametrize("graph,updates", MODES)
def test_cond_switch_modes(graph, updates):
  c = Counter()
  inc = lambda c: c(None)
  nnx.cond(True, inc, lambda c: None, c, graph=graph, graph_updates=updates)
  nnx.switch(1, [lambda c: None, inc], c, graph=graph, graph_updates=updates)
  assert int(c.count.value) == 2
  if not graph:
    with pytest.raises(errors.TransformError, match="Duplicate Count"):
      nnx.cond(True, lambda a, b: None, lambda a, b: None, c, c, graph=False)


@pytest.mark.parametrize("graph,updates", MODES)
def test_loops_modes_and_replaced_variable(graph, updates):
  c = Counter()
  out = nnx.fori_loop(0, 4, lambda i, c: (c(None), c)[1], c, graph=graph, graph_updates=updates)
  assert out is c and int(c.count.value) == 4

  def replace(c):
    c.count = type(c.count)(c.count[...] + 1)
    return c

  with pytest.raises(errors.TransformError, match="Variable identity must be preserved"):
    nnx.while_loop(lambda c: c.count[...] < 6, replace, c, graph=graph, graph_updates=updates)
  assert int(c.count.value) == 4
