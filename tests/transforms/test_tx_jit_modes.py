"""jit in tree mode / without graph updates, in_shardings and out_shardings prefixes,
lower/compile, jit_partial, prefix, and the bound-method and prefix checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors


class Counter(nnx.Module):
  def __init__(self):
    self.n = nnx.Variable(jnp.array(0))
    self.w = nnx.Param(jnp.ones((4, 2)))


@pytest.fixture
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))


@pytest.mark.parametrize("graph,updates", [(True, True), (True, False), (False, False)])
def test_values_flow_back_in_every_mode_without_retrace(graph, updates):
  traces = []

  @nnx.jit(graph=graph, graph_updates=updates)
  def step(c, x):
    traces.append(1)
    c.n[...] += 1
    return x @ c.w[...]

  c = Counter()
  y = step(c, jnp.ones((1, 4)))
  step(c, jnp.ones((1, 4)))
  np.testing.assert_allclose(y, [[4.0, 4.0]])
  assert int(c.n[...]) == 2 and len(traces) == 1


def test_tree_mode_refuses_a_variable_passed_twice():
  v = nnx.Param(jnp.array(1.0))
  f = nnx.jit(lambda a, b: a[...] + b[...], graph=False)
  with pytest.raises(errors.TransformError, match=r"Duplicate Param found at paths"):
    f(v, v)
  # graph mode (even without updates) accepts the shared Variable
  assert float(nnx.jit(lambda a, b: a[...] + b[...], graph_updates=False)(v, v)) == 2.0


def test_tree_mode_refuses_returning_an_input():
  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(errors.TransformError, match=r"does not support Variable aliasing"):
    nnx.jit(lambda v: v, graph=False)(v)


def test_tree_mode_returns_new_objects():
  out = nnx.jit(lambda x: nnx.Param(x + 1), graph=False)(jnp.array(1.0))
  assert isinstance(out, nnx.Param) and float(out[...]) == 2.0


def test_without_graph_updates_a_structure_change_is_an_error_not_silently_lost():
  @nnx.jit(graph_updates=False)
  def f(c):
    c.extra = nnx.Param(jnp.zeros(()))

  c = Counter()
  with pytest.raises(errors.TransformError, match=r"graph_updates=False changed the structure"):
    f(c)
  assert not hasattr(c, "extra")


def test_mode_default_comes_from_set_graph_mode():
  v = nnx.Param(jnp.array(1.0))
  with nnx.set_graph_mode(False):
    f = nnx.jit(lambda a, b: a[...] + b[...])
  with pytest.raises(errors.TransformError, match="Duplicate"):
    f(v, v)


def test_in_shardings_sharding_for_a_module_applies_to_all_its_state(mesh):
  c = Counter()
  rep = NamedSharding(mesh, P())
  nnx.jit(lambda c: None, in_shardings=(rep,))(c)
  assert c.w[...].sharding.is_equivalent_to(rep, 2)


def test_in_shardings_state_sharding_and_prefix_per_variable(mesh):
  spec = {nnx.PathContains("w"): NamedSharding(mesh, P("a", "b")), ...: None}
  c = Counter()
  nnx.jit(lambda c: None, in_shardings=(nnx.StateSharding(spec),))(c)
  assert c.w[...].sharding.spec == P("a", "b")
  c2 = Counter()
  nnx.jit(lambda c: None, in_shardings=(nnx.prefix(c2, spec),))(c2)
  assert c2.w[...].sharding.spec == P("a", "b")


def test_in_shardings_skip_static_positions_as_in_jax(mesh):
  x_sharding = NamedSharding(mesh, P("a"))
  f = nnx.jit(lambda x, relu: jnp.maximum(x, 0) if relu else x, static_argnums=1,
              in_shardings=(x_sharding,), out_shardings=x_sharding)
  y = f(jnp.arange(-4.0, 4.0).reshape(8, 1), True)
  assert y.sharding.spec == P("a") and float(y.min()) == 0.0


def test_in_shardings_inconsistent_for_one_object_is_an_error(mesh):
  v = nnx.Param(jnp.ones(8))
  f = nnx.jit(lambda a, b: a[...] + b[...],
              in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("a"))))
  with pytest.raises(errors.TransformError, match=r"Inconsistent aliasing: arguments 0 and 1"):
    f(v, v)


def test_out_shardings_prefix_lays_out_a_returned_module(mesh):
  proto = Counter()
  out_prefix = nnx.prefix(proto, {nnx.PathContains("w"): NamedSharding(mesh, P("a")),
                                  ...: None})
  m = nnx.jit(Counter, out_shardings=out_prefix, graph_updates=False)()
  assert m.w[...].sharding.spec == P("a")


def test_prefix_checks():
  with pytest.raises(errors.TransformError, match="Graph nodes are not allowed as prefixes"):
    nnx.jit(lambda x: x, in_shardings=Counter())
  with pytest.raises(errors.TransformError, match="cannot contain `StateSharding` objects"):
    nnx.jit(lambda x: x, in_shardings=nnx.StateSharding({...: None}), graph=False)
  with pytest.raises(errors.TransformError, match="Variables cannot be prefixes"):
    nnx.jit(lambda x: x, in_shardings=(nnx.Param(jnp.ones(2)),))


def test_prefix_builds_a_state_per_object_and_refuses_unmatched():
  c = Counter()
  p = nnx.prefix(c, lambda path, v: path[-1])
  assert p["n"] == "n" and p["w"] == "w"
  with pytest.raises(errors.TransformError, match=r"No filter matched leaf at path n"):
    nnx.prefix(c, {nnx.Param: 0})


def test_lower_compile_runs_with_objects_and_writes_back():
  c = Counter()

  @nnx.jit
  def step(c, x):
    c.n[...] += 1
    return x @ c.w[...]

  compiled = step.lower(c, jnp.ones((1, 4))).compile()
  assert compiled.as_text()
  np.testing.assert_allclose(compiled(c, jnp.ones((1, 4))), [[4.0, 4.0]])
  compiled(c, jnp.ones((1, 4)))
  assert int(c.n[...]) == 2


@pytest.mark.parametrize("graph", [True, False])
def test_jit_partial_binds_objects_and_updates_them(graph):
  c = Counter()

  def step(c, x):
    c.n[...] += 1
    return x @ c.w[...]

  f = nnx.jit_partial(step, c, graph=graph, graph_updates=False)
  np.testing.assert_allclose(f(jnp.ones((1, 4))), [[4.0, 4.0]])
  c.w[...] = jnp.zeros((4, 2))
  np.testing.assert_allclose(f(jnp.ones((1, 4))), [[0.0, 0.0]])
  compiled = f.lower(jnp.ones((1, 4))).compile()
  compiled(jnp.ones((1, 4)))
  assert int(c.n[...]) == 3


def test_jit_partial_tree_mode_refuses_shared_variables_at_once():
  class Holder(nnx.Module):
    def __init__(self, v):
      self.v = v

  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(errors.TransformError, match="Duplicate Param"):
    nnx.jit_partial(lambda a, b: None, Holder(v), Holder(v), graph=False)


def test_cached_partial():
  c = Counter()
  f = nnx.cached_partial(nnx.jit(lambda c, x: x @ c.w[...]), c)
  assert f(jnp.ones((1, 4))).shape == (1, 2)


@pytest.mark.parametrize("make", [
    lambda m: nnx.jit(m.f), lambda m: nnx.grad(m.f), lambda m: nnx.value_and_grad(m.f),
    lambda m: nnx.remat(m.f), lambda m: nnx.eval_shape(m.f, 1.0),
    lambda m: nnx.shard_map(m.f, mesh=None, in_specs=None, out_specs=None),
    lambda m: nnx.checkify(m.f), lambda m: nnx.pmap(m.f), lambda m: nnx.custom_vjp(m.f),
    lambda m: nnx.vjp(m.f, 1.0), lambda m: nnx.make_jaxpr(m.f),
    lambda m: nnx.jit_partial(m.f)])
def test_bound_methods_are_refused(make):
  class M(nnx.Module):
    def f(self, x):
      return x

  with pytest.raises(errors.TransformError, match=r"does not support bound methods \(M.f"):
    make(M())
  assert isinstance(errors.TransformError("x"), ValueError)


def test_static_argnames_cover_positional_arguments_as_in_jax():
  traces = []

  @nnx.jit(static_argnames=("relu",))
  def f(x, relu):
    traces.append(relu)
    return jnp.maximum(x, 0) if relu else x   # a traced `relu` would raise here

  assert float(f(jnp.array(-1.0), True)) == 0.0
  assert float(f(jnp.array(-1.0), False)) == -1.0
  assert traces == [True, False]


def test_in_shardings_for_a_module_with_a_structure_change_inside(mesh):
  rep = NamedSharding(mesh, P())

  @nnx.jit(in_shardings=(rep,))
  def grow(c):
    c.extra = nnx.Param(jnp.zeros(3))

  c = Counter()
  grow(c)
  assert c.extra[...].shape == (3,) and c.w[...].sharding.is_equivalent_to(rep, 2)


def test_jit_returning_a_self_referencing_module():
  class Node(nnx.Module):

    def __init__(self):
      self.ref = nnx.data(None)
      self.w = nnx.Param(jnp.ones(2))

  @nnx.jit
  def f(m):
    m.ref = m
    m.w.value = m.w.value * 2
    return m

  m = Node()
  out = f(m)
  assert out is m and m.ref is m
  np.testing.assert_allclose(m.w.value, 2.0)


def test_state_argument_merged_and_updated_inside_jit():
  # The State's Variables are rebuilt inside the trace; merge reuses them, so they
  # belong to the jit frame and can take traced values.
  graphdef, state = nnx.split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))

  kernel = np.asarray(state["kernel"].value)

  @nnx.jit
  def step(state, x):
    model = nnx.merge(graphdef, state)
    model.kernel.value = model.kernel.value * 2
    return model(x)

  y = step(state, jnp.ones((1, 2)))
  np.testing.assert_allclose(y, jnp.ones((1, 2)) @ (2 * kernel), rtol=1e-6)


def test_captured_variable_still_refuses_a_tracer():
  outer = nnx.Param(jnp.ones(2))

  @nnx.jit
  def leak(x):
    outer.value = x

  with pytest.raises(errors.TraceContextError, match="created outside the transform"):
    leak(jnp.zeros(2))
