"""Tests for spmdnnx.spmd._constrain: logical-name constraints on activations."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spmdnnx import errors
from spmdnnx.spmd._constrain import constrain
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._mesh import MeshConfig, make_mesh


@pytest.fixture
def mesh():
  return make_mesh(MeshConfig(fsdp=4, tensor=2))


def test_noop_without_context():
  x = jnp.ones((8, 16))
  assert constrain(x, ("batch", "nonsense")) is x
  assert jax.jit(lambda y: constrain(y, ("batch", "embed")))(x).shape == (8, 16)


def test_constrains_inside_jit(mesh):
  x = jnp.ones((8, 4, 16))

  def f(y):
    return constrain(y * 2, ("batch", "length", "mlp"))

  with use_sharding(mesh, "fsdp_tp"):
    out = jax.jit(f)(x)
  expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
  assert out.sharding.is_equivalent_to(expected, 3)
  assert out.addressable_shards[0].data.shape == (2, 4, 8)


def test_explicit_mesh_and_rules(mesh):
  out = jax.jit(lambda y: constrain(y, ("embed",), mesh=mesh, rules="fsdp"))(jnp.ones(8))
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 1)


def test_unknown_name_raises_inside_and_outside_jit(mesh):
  with use_sharding(mesh, "fsdp_tp"):
    with pytest.raises(errors.AxisRulesError,
                       match=r"No axis rule for logical name\(s\) \['hidden'\]; used by: "
                             r"activation \['hidden'\]"):
      jax.jit(lambda y: constrain(y, ("batch", "hidden")))(jnp.ones((8, 4)))
  with use_sharding(None, "fsdp_tp"):
    with pytest.raises(errors.AxisRulesError, match=r"used by: h \['hidden'\]"):
      constrain(jnp.ones(4), ("hidden",), name="h")


def test_rules_only_context_is_a_noop():
  x = jnp.ones((8, 4))
  with use_sharding(None, "fsdp_tp"):
    assert constrain(x, ("batch", "embed")) is x


def test_rank_mismatch_raises(mesh):
  with use_sharding(mesh, "fsdp"):
    with pytest.raises(errors.MetadataError,
                       match=r"x: logical_axes \('batch',\) has 1 entries but the array has "
                             r"shape \(8, 4\)"):
      constrain(jnp.ones((8, 4)), ("batch",), name="x")


def test_indivisible_dimension_warns(mesh):
  with use_sharding(mesh, "fsdp_tp"):
    with pytest.warns(errors.ShardingWarning, match=r"activation dim 1 \('mlp', size 3"):
      constrain(jnp.ones((8, 3)), ("batch", "mlp"))


def test_single_name_string(mesh):
  with use_sharding(mesh, "fsdp"):
    out = constrain(jnp.ones(8), "embed")
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 1)
