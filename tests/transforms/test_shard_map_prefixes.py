"""shard_map in_specs given per Variable (State, nnx.prefix, StateSharding(State)) and aliasing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors


@pytest.fixture
def mesh():
  return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def _lin():
  return nnx.Linear(2, 16, rngs=nnx.Rngs(0))


def test_state_spec_over_a_split_state_gives_local_shards(mesh):
  m = _lin()
  graphdef, state = nnx.split(m)
  seen = {}

  def f(s):
    inner = nnx.merge(graphdef, s)
    seen["k"], seen["b"] = inner.kernel.shape, inner.bias.shape
    return jax.lax.psum(inner.kernel[...].sum(), "d")

  spec = nnx.State({"kernel": P(None, "d"), "bias": P()})
  total = nnx.shard_map(f, mesh=mesh, in_specs=(spec,), out_specs=P(),
                        graph_updates=False)(state)
  assert seen == {"k": (2, 2), "b": (16,)}
  np.testing.assert_allclose(total, m.kernel[...].sum(), rtol=1e-5)


@pytest.mark.parametrize("graph", [True, False])
def test_prefix_state_over_a_module(mesh, graph):
  m = _lin()
  spec = nnx.prefix(m, {nnx.PathContains("kernel"): P(None, "d"), ...: P()})
  seen = {}

  def f(m):
    seen["k"], seen["b"] = m.kernel.shape, m.bias.shape
    m.bias[...] = m.bias[...] + 1.0

  nnx.shard_map(f, mesh=mesh, in_specs=(spec,), out_specs=None, graph=graph,
                graph_updates=False)(m)
  assert seen == {"k": (2, 2), "b": (16,)}
  np.testing.assert_allclose(m.bias[...], jnp.ones(16))


def test_state_sharding_built_from_a_state_matches_per_path(mesh):
  m = _lin()
  sharding = nnx.StateSharding(nnx.State({"kernel": P(None, "d"), "bias": P()}))
  seen = {}

  def f(m):
    seen["k"], seen["b"] = m.kernel.shape, m.bias.shape

  nnx.shard_map(f, mesh=mesh, in_specs=(sharding,), out_specs=None)(m)
  assert seen == {"k": (2, 2), "b": (16,)}
  assert m.kernel[...].sharding.spec == P(None, "d")
  assert m.bias[...].sharding.spec == P()


def test_state_sharding_from_a_state_missing_a_path(mesh):
  sharding = nnx.StateSharding(nnx.State({"kernel": P(None, "d")}))
  with pytest.raises(errors.TransformError, match="StateSharding filters do not match bias"):
    nnx.shard_map(lambda m: None, mesh=mesh, in_specs=(sharding,), out_specs=None)(_lin())


def test_tensor_parallel_mlp_matches_the_unsharded_result(mesh):
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(4, 16, use_bias=False, rngs=rngs)
      self.down = nnx.Linear(16, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.relu(self.up(x)))

  m = MLP(nnx.Rngs(0))
  x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  ref = m(x)
  sharding = nnx.StateSharding({nnx.PathContains("up"): P(None, "d"),
                                nnx.PathContains("down"): P("d", None)})

  def f(m, x):
    assert m.up.kernel.shape == (4, 2) and m.down.kernel.shape == (2, 3)
    return jax.lax.psum(m(x), "d")

  y = nnx.shard_map(f, mesh=mesh, in_specs=(sharding, P()), out_specs=P())(m, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_prefix_state_without_an_entry_is_an_error_not_a_silent_default(mesh):
  other = nnx.prefix(nnx.Linear(2, 16, use_bias=False, rngs=nnx.Rngs(0)), lambda p, v: P())
  with pytest.raises(errors.TransformError, match=r"in_specs State has no entry for bias"):
    nnx.shard_map(lambda m: None, mesh=mesh, in_specs=(other,), out_specs=None,
                  graph_updates=False)(_lin())


def test_spec_pytree_of_another_structure(mesh):
  _, state = nnx.split(_lin())
  with pytest.raises(errors.TransformError, match=r"entry at argument 0 has structure"):
    nnx.shard_map(lambda s: None, mesh=mesh, in_specs=(nnx.State({"kernel": P()}),),
                  out_specs=None, graph_updates=False)(state)


def test_state_spec_for_a_plain_array(mesh):
  with pytest.raises(errors.TransformError, match=r"in_specs gives a State at argument 0"):
    nnx.shard_map(lambda x: x, mesh=mesh, in_specs=(nnx.State({"a": P()}),),
                  out_specs=P())(jnp.ones(8))


def test_a_graph_object_spec_of_another_kind(mesh):
  with pytest.raises(errors.TransformError, match=r"must be a PartitionSpec, a StateSharding"):
    nnx.shard_map(lambda m: None, mesh=mesh, in_specs=(3,), out_specs=None)(_lin())


def test_state_sharding_needs_graph_updates(mesh):
  with pytest.raises(errors.TransformError, match="cannot contain `StateSharding` objects"):
    nnx.shard_map(lambda m: None, mesh=mesh, in_specs=(nnx.StateSharding({...: P()}),),
                  out_specs=None, graph_updates=False)


@pytest.mark.parametrize("graph_updates", [True, False])
def test_inconsistent_aliasing(mesh, graph_updates):
  v = nnx.Param(jnp.ones(8))
  f = nnx.shard_map(lambda a, b: a[...].sum() + b[...].sum(), mesh=mesh,
                    in_specs=(P(), P("d")), out_specs=P(), graph_updates=graph_updates)
  with pytest.raises(errors.TransformError, match=r"Inconsistent aliasing detected\. The "
                     r"following nodes have different prefixes") as e:
    f(v, v)
  assert isinstance(e.value, ValueError)
  assert "argument 0: P()" in str(e.value) and "argument 1: P('d',)" in str(e.value)


@pytest.mark.parametrize("graph_updates", [True, False])
def test_shared_variable_with_equal_specs_in_graph_mode(mesh, graph_updates):
  v = nnx.Param(jnp.array(1.0))
  c1, c2 = nnx.Dict(v=v), nnx.Dict(v=v)

  def f(a, b, x):
    a.v[...] += x
    return a.v[...] + b.v[...]

  y = nnx.shard_map(f, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P(),
                    graph_updates=graph_updates)(c1, c2, jnp.array(1.0))
  np.testing.assert_allclose(y, 4.0)
  np.testing.assert_allclose(v[...], 2.0)


def test_shared_variable_in_tree_mode_is_refused(mesh):
  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(errors.TransformError, match="Duplicate Param found"):
    nnx.shard_map(lambda a, b: a[...], mesh=mesh, in_specs=(P(), P()), out_specs=P(),
                  graph=False)(nnx.Dict(v=v), nnx.Dict(v=v))


def test_state_sharding_from_a_nested_state_uses_full_paths():
  s = nnx.StateSharding(nnx.State({"up": {"kernel": P(None, "d")}, "kernel": P("d")}))
  assert s.spec_for(("up", "kernel"), None) == P(None, "d")
  assert s.spec_for(("kernel",), None) == P("d")
  with pytest.raises(errors.TransformError, match="do not match down/kernel"):
    s.spec_for(("down", "kernel"), None)
