"""Tests for remat, checkpoint_name, eval_shape, shard_map and split_rngs."""

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors
from tx_models import Block, Counter, Drop, Linear, RunningMean, close

POLICY_NAMES = ["none", "full", "nothing_saveable", "everything_saveable", "save_dots",
                "dots_saveable", "save_dots_without_batch_dims",
                "dots_with_no_batch_dims_saveable"]


def loss(m, x):
  return (m(x) ** 2).sum()


# --- remat -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None] + POLICY_NAMES)
def test_remat_values_and_grads_match_plain(policy):
  blk = Block(3, 5, rngs=nnx.Rngs(0))
  x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
  rem = nnx.remat(lambda m, x: m(x), policy=policy)
  assert close(rem(blk, x), blk(x))
  g_ref = nnx.grad(loss)(blk, x)
  g_rem = nnx.grad(lambda m, x: (rem(m, x) ** 2).sum())(blk, x)
  for lin in ("up", "down"):
    for p in ("w", "b"):
      assert close(g_rem[lin][p].value, g_ref[lin][p].value)


def test_remat_as_decorator_under_jit_propagates_state():
  rm = RunningMean(3)

  @nnx.remat(policy="save_dots")
  def apply(m, x):
    return m(x)

  @nnx.jit
  def step(m, x):
    return nnx.grad(lambda m, x: apply(m, x).sum())(m, x)

  x = jnp.arange(6.0).reshape(2, 3)
  step(rm, x)
  assert close(rm.mean.value, 0.5 * x.mean(axis=0))


def test_remat_accepts_policy_callable():
  f = nnx.remat(lambda m, x: m(x), policy=jax.checkpoint_policies.dots_saveable)
  blk = Block(3, 5, rngs=nnx.Rngs(0))
  assert close(f(blk, jnp.ones((1, 3))), blk(jnp.ones((1, 3))))


def test_remat_unknown_policy_name():
  with pytest.raises(errors.TransformError,
                     match=r"Unknown remat policy 'save_everything'; use one of .*'full'"):
    nnx.remat(lambda x: x, policy="save_everything")


def test_remat_save_only_named_requires_names():
  with pytest.raises(errors.TransformError, match="save_only_named' needs names="):
    nnx.remat(lambda x: x, policy="save_only_named")


def test_remat_static_argnums_rejected():
  with pytest.raises(errors.TransformError, match="static_argnums is not supported.*partial"):
    nnx.remat(lambda x, n: x, static_argnums=(1,))


def _residuals(f, *args, capsys):
  print_saved_residuals(f, *args)
  return capsys.readouterr().out


def _tagged(x):
  a = nnx.checkpoint_name(jnp.sin(x), "hidden")
  b = jnp.sin(a) @ jnp.ones((3, 3))
  return jnp.sin(b).sum()


def test_checkpoint_name_with_save_only_named_keeps_only_that_value(capsys):
  x = jnp.ones((3, 3))
  named = _residuals(nnx.remat(_tagged, policy="save_only_named", names=("hidden",)), x,
                     capsys=capsys)
  assert "named 'hidden'" in named
  assert "dot_general" not in named and "cos" not in named
  full = _residuals(nnx.remat(_tagged, policy="full"), x, capsys=capsys)
  assert "named 'hidden'" not in full
  assert full.strip().splitlines() == ["f32[3,3] from the argument x"]
  dots = _residuals(nnx.remat(_tagged, policy="save_dots"), x, capsys=capsys)
  assert "dot_general" in dots and "named 'hidden'" not in dots
  other = _residuals(nnx.remat(_tagged, policy="save_only_named", names=("other",)), x,
                     capsys=capsys)
  assert "named 'hidden'" not in other


def test_resolve_policy_names():
  assert nnx.resolve_policy("full") is jax.checkpoint_policies.nothing_saveable
  assert nnx.resolve_policy(None) is None
  with pytest.raises(errors.TransformError, match="Unknown remat policy"):
    nnx.resolve_policy("bogus")


# --- eval_shape ------------------------------------------------------------------------


def test_eval_shape_returns_abstract_variables_with_metadata():
  abstract = nnx.eval_shape(lambda: Linear(4, 8, rngs=nnx.Rngs(0)))
  assert isinstance(abstract, Linear)
  assert isinstance(abstract.w, nnx.Param)
  assert abstract.w.value == jax.ShapeDtypeStruct((4, 8), jnp.float32)
  assert abstract.w.logical_axes == ("embed", "mlp")
  assert abstract.b.logical_axes == ("mlp",)


def test_eval_shape_of_stack_keeps_layers_axis():
  @nnx.split_rngs(splits=6)
  @nnx.vmap
  def create(r):
    return Linear(4, 8, rngs=r)

  abstract = nnx.eval_shape(create, nnx.Rngs(0))
  assert abstract.w.value.shape == (6, 4, 8)
  assert abstract.w.logical_axes == ("layers", "embed", "mlp")


def test_eval_shape_does_not_touch_inputs():
  rngs = nnx.Rngs(0)
  rm = RunningMean(3)
  nnx.eval_shape(lambda r: Linear(4, 8, rngs=r), rngs)
  assert int(rngs.default.count.value) == 0
  out = nnx.eval_shape(lambda m, x: m(x), rm, jnp.ones((2, 3)))
  assert out == jax.ShapeDtypeStruct((2, 3), jnp.float32)
  assert close(rm.mean.value, jnp.zeros(3))
  assert isinstance(rm.mean.value, jax.Array)


# --- shard_map -------------------------------------------------------------------------


@pytest.fixture
def mesh():
  return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def test_shard_map_module_with_state_sharding(mesh):
  lin = Linear(4, 8, rngs=nnx.Rngs(0))
  c = Counter()
  seen = {}
  x = jnp.ones((2, 4))
  ref = lin(x)

  def f(m, c, x):
    seen["w"], seen["b"] = m.w.shape, m.b.shape
    c.count += 1
    out = m(x)
    m.b.value = m.b.value + 1.0
    return out

  specs = nnx.StateSharding({nnx.PathContains("w"): P(None, "d"),
                             nnx.PathContains("b"): P("d")})
  out = nnx.shard_map(f, mesh=mesh, in_specs=(specs, P(), P()),
                      out_specs=P(None, "d"))(lin, c, x)
  assert seen == {"w": (4, 1), "b": (1,)}
  assert close(out, ref)
  assert int(c.count.value) == 1
  assert close(lin.b.value, jnp.ones(8))
  assert lin.b.value.sharding.spec == P("d")
  assert lin.w.logical_axes == ("embed", "mlp")


def test_shard_map_module_with_one_partition_spec(mesh):
  class Vec(nnx.Module):
    def __init__(self):
      self.v = nnx.Param(jnp.arange(16.0))

  m = Vec()

  def f(m):
    m.v.value = m.v.value * 2.0
    return jax.lax.psum(m.v.value.sum(), "d")

  total = nnx.shard_map(f, mesh=mesh, in_specs=(P("d"),), out_specs=P())(m)
  assert float(total) == 2.0 * 120.0
  assert close(m.v.value, 2.0 * jnp.arange(16.0))


def test_shard_map_state_sharding_not_covering(mesh):
  lin = Linear(8, 8, rngs=nnx.Rngs(0))
  specs = nnx.StateSharding({nnx.PathContains("w"): P()})
  with pytest.raises(errors.TransformError,
                     match=r"StateSharding filters do not match b.*`...: PartitionSpec\(\)`"):
    nnx.shard_map(lambda m: m.b.value, mesh=mesh, in_specs=(specs,), out_specs=P())(lin)


def test_shard_map_in_specs_count(mesh):
  with pytest.raises(errors.TransformError, match="in_specs has 2 entries for 1 arguments"):
    nnx.shard_map(lambda x: x, mesh=mesh, in_specs=(P(), P()), out_specs=P())(jnp.ones(8))


# --- split_rngs ------------------------------------------------------------------------


def test_split_rngs_context_manager_restores_and_advances():
  rngs = nnx.Rngs(0, dropout=1)
  with nnx.split_rngs(rngs, splits=4):
    assert rngs.default.key.value.shape == (4,)
    assert rngs.dropout.key.value.shape == (4,)
    assert rngs.dropout.count.value.shape == (4,)
  assert rngs.default.key.value.shape == ()
  assert int(rngs.default.count.value) == 1
  assert int(rngs.dropout.count.value) == 1


def test_split_rngs_only_filter():
  rngs = nnx.Rngs(params=0, dropout=1)
  with nnx.split_rngs(rngs, splits=3, only="dropout"):
    assert rngs.dropout.key.value.shape == (3,)
    assert rngs.params.key.value.shape == ()
  assert int(rngs.params.count.value) == 0


def test_split_rngs_decorator_gives_distinct_keys_per_slice():
  rngs = nnx.Rngs(dropout=2)
  drop = Drop(0.5, rngs=rngs)

  @nnx.split_rngs(splits=4)
  @nnx.vmap(in_axes=(0, 0))
  def apply(d, x):
    return d(x)

  masks = apply(drop, jnp.ones((4, 32))) != 0
  for i in range(4):
    for j in range(i + 1, 4):
      assert bool((masks[i] != masks[j]).any())
  assert rngs.dropout.key.value.shape == ()
  again = apply(drop, jnp.ones((4, 32))) != 0
  assert bool((again != masks).any())


def test_split_rngs_bad_splits():
  with pytest.raises(errors.TransformError, match="splits must be positive, got 0"):
    with nnx.split_rngs(nnx.Rngs(0), splits=0):
      pass


def test_split_rngs_squeeze_gives_one_fresh_key_of_the_original_shape():
  rngs = nnx.Rngs(0)
  plain_next = jax.random.key_data(nnx.Rngs(0).default())
  with nnx.split_rngs(rngs, splits=1, squeeze=True):
    assert rngs.default.key.value.shape == ()
    assert rngs.default.count.value.shape == ()
    inner = jax.random.key_data(rngs.default.key.value)
    assert not jnp.array_equal(inner, plain_next)
  assert rngs.default.key.value.shape == ()
  assert int(rngs.default.count.value) == 1  # the split drew one key


def test_split_rngs_squeeze_in_a_decorator():
  @nnx.split_rngs(splits=1, squeeze=True)
  def shape_of(r):
    return r.default.key.value.shape

  assert shape_of(nnx.Rngs(0)) == ()


def test_split_rngs_squeeze_needs_one_split():
  with pytest.raises(errors.TransformError,
                     match=r"squeeze=True needs splits=1 .*got splits=4; drop squeeze"):
    nnx.split_rngs(nnx.Rngs(0), splits=4, squeeze=True)


def test_shard_map_returning_a_module_error(mesh):
  lin = Linear(4, 8, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError, match=r"shard_map\(.*\): the function must keep "
                     r"the graph's structure and return arrays"):
    nnx.shard_map(lambda m: m, mesh=mesh, in_specs=(P(),), out_specs=P())(lin)
