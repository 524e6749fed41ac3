"""LayerNorm, RMSNorm, BatchNorm, GroupNorm against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply, param_grads

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import BatchNorm, GroupNorm, LayerNorm, RMSNorm, initializers


def _x(shape, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * 3 + 1


@pytest.mark.parametrize("fast", [True, False])
def test_layer_norm_matches_reference(fast):
  ln = LayerNorm(4, use_fast_variance=fast, scale_init=initializers.normal(1.0),
                 bias_init=initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = _x((3, 4))
  s, b = np.asarray(ln.scale.value), np.asarray(ln.bias.value)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * s + b
  close(ln(jnp.asarray(x)), ref, 1e-4)
  g = param_grads(ln, lambda m: jnp.sum(m(jnp.asarray(x)) * jnp.arange(4.0)))
  close(g["bias"].value, np.broadcast_to(np.arange(4.0) * 3, (4,)), 1e-4)
  norm = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  close(g["scale"].value, (norm * np.arange(4.0)).sum(0), 1e-4)


def test_layer_norm_dtypes_and_axes():
  ln = LayerNorm(4, rngs=nnx.Rngs(0))
  assert ln.scale.logical_axes == ("norm",) and ln.bias.logical_axes == ("norm",)
  x16 = jnp.asarray(_x((2, 4)), jnp.bfloat16)
  assert ln(x16).dtype == jnp.float32   # f32 params, dtype=None
  ln16 = LayerNorm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = ln16(x16)
  assert y.dtype == jnp.bfloat16
  close(y, ln(x16), 2e-2)
  assert LayerNorm(4, scale_axes=("embed",), rngs=nnx.Rngs(0)).scale.logical_axes == ("embed",)


def test_rms_norm_matches_reference():
  rms = RMSNorm(4, scale_init=initializers.normal(1.0), rngs=nnx.Rngs(0))
  assert rms.bias is None
  x = _x((2, 3, 4))
  ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(rms.scale.value)
  close(rms(jnp.asarray(x)), ref, 1e-4)
  g = param_grads(rms, lambda m: jnp.sum(m(jnp.asarray(x))))
  close(g["scale"].value, (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)).sum((0, 1)), 1e-4)


def test_batch_norm_train_and_eval_inside_jit():
  bn = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  assert bn.mean.logical_axes == ("norm",) and isinstance(bn.mean, nnx.BatchStat)
  x = _x((8, 2, 3))
  y = jit_apply(bn, lambda m, x: m(x), jnp.asarray(x))
  mu, var = x.mean((0, 1)), x.var((0, 1))
  close(y, (x - mu) / np.sqrt(var + 1e-5), 1e-4)
  close(bn.mean.value, 0.1 * mu, 1e-5)
  close(bn.var.value, 0.9 + 0.1 * var, 1e-4)
  bn.eval()
  assert bn.use_running_average is True
  before = np.asarray(bn.mean.value)
  y_eval = jit_apply(bn, lambda m, x: m(x), jnp.asarray(x))
  close(y_eval, (x - 0.1 * mu) / np.sqrt(0.9 + 0.1 * var + 1e-5), 1e-4)
  close(bn.mean.value, before)
  bn.train()
  jit_apply(bn, lambda m, x: m(x, use_running_average=True), jnp.asarray(x))
  close(bn.mean.value, before)   # call argument wins over the attribute


def test_batch_norm_grad_through_batch_stats():
  bn = BatchNorm(2, rngs=nnx.Rngs(0))
  x = jnp.asarray(_x((4, 2)))
  g = param_grads(bn, lambda m: jnp.sum(m(x) ** 2))
  close(g["scale"].value, [8.0, 8.0], 1e-3)  # sum of squared standardized values
  close(g["bias"].value, [0.0, 0.0], 1e-4)


def test_group_norm_matches_reference():
  gn = GroupNorm(6, num_groups=3, scale_init=initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = _x((2, 5, 6))
  xg = x.reshape(2, 5, 3, 2)
  mu = xg.mean((1, 3), keepdims=True)
  var = xg.var((1, 3), keepdims=True)
  ref = ((xg - mu) / np.sqrt(var + 1e-6)).reshape(2, 5, 6) * np.asarray(gn.scale.value)
  close(gn(jnp.asarray(x)), ref, 1e-4)
  assert GroupNorm(6, num_groups=None, group_size=3, rngs=nnx.Rngs(0)).num_groups == 2


def test_norm_errors():
  with pytest.raises(errors.ConfigError, match=r"LayerNorm: num_features must be a positive int"):
    LayerNorm(0)
  with pytest.raises(errors.ShapeError, match=r"LayerNorm: expected 4 features on axis \(1,\), "
                                              r"got an input of shape \(2, 3\)"):
    LayerNorm(4)(jnp.ones((2, 3)))
  with pytest.raises(errors.ShapeError, match=r"BatchNorm: expected 3 features"):
    BatchNorm(3)(jnp.ones((2, 4)))
  with pytest.raises(errors.ConfigError, match=r"momentum must be in \[0, 1\]"):
    BatchNorm(3, momentum=1.5)
  with pytest.raises(errors.ConfigError, match=r"num_groups 4 must divide num_features 6"):
    GroupNorm(6, num_groups=4)
  with pytest.raises(errors.ConfigError, match=r"exactly one of num_groups and group_size"):
    GroupNorm(6, num_groups=2, group_size=3)
  with pytest.raises(errors.MetadataError, match=r"scale_axes \('a', 'b'\) has 2 entries"):
    RMSNorm(4, scale_axes=("a", "b"))
  with pytest.raises(errors.ConfigError, match=r"group_size 4 must divide num_features 6"):
    GroupNorm(6, num_groups=None, group_size=4)
  gn = GroupNorm(4, num_groups=2, reduction_axes=(1,), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"GroupNorm: reduction_axes \(1,\) must include "
                                               r"the feature axis -1") as e:
    gn(jnp.ones((2, 3, 4)))
  assert e.value.axes == (1,) and e.value.shapes == [(2, 3, 4)]


def test_norm_errors_carry_fields():
  with pytest.raises(errors.ShapeError, match="expected 4 features") as e:
    LayerNorm(4, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))
  assert e.value.shapes == [(2, 3)] and e.value.axes == (1,)
  with pytest.raises(errors.ConfigError, match="momentum") as e:
    BatchNorm(3, momentum=-0.5)
  assert e.value.argument == "momentum" and e.value.value == -0.5


class _Residual(nnx.Module):
  def __init__(self, make, depth):
    self.layers = [make() for _ in range(depth)]

  def __call__(self, x):
    for layer in self.layers:
      x = x + layer(x)
    return x


def _grad_hlo_lines(make, depth):
  graphdef, state = nnx.split(_Residual(make, depth))
  step = jax.jit(jax.grad(lambda s, x: jnp.mean(nnx.merge(graphdef, s)(x) ** 2)))
  return step.lower(state, jnp.ones((8, 8, 64))).compile().as_text().count("\n")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm"])
def test_grad_step_hlo_grows_linearly_with_depth(kind):
  # Issue 9 item 11: XLA:CPU re-inlined the whole residual stream into every
  # later fusion, so the optimized HLO (and compile time) of an unrolled
  # x + Norm(x) stack grew quadratically (LayerNorm/BatchNorm: 3.1x from 4 to
  # 8 blocks). Linear growth doubles it.
  make = {"LayerNorm": lambda: LayerNorm(64, rngs=nnx.Rngs(0)),
          "RMSNorm": lambda: RMSNorm(64, rngs=nnx.Rngs(0)),
          "BatchNorm": lambda: BatchNorm(64, rngs=nnx.Rngs(0)),
          "GroupNorm": lambda: GroupNorm(64, num_groups=8, rngs=nnx.Rngs(0))}[kind]
  four, eight = _grad_hlo_lines(make, 4), _grad_hlo_lines(make, 8)
  assert eight / four < 2.3, (four, eight)


# --- InstanceNorm, WeightNorm, SpectralNorm, Flax keywords --------------------


def test_instance_norm_normalizes_each_example_and_feature_over_space():
  from spmdnnx.nn import InstanceNorm
  x = jax.random.normal(jax.random.key(0), (2, 5, 3)) * 3.0 + 1.0
  norm = InstanceNorm(3, rngs=nnx.Rngs(0))
  y = np.asarray(norm(x))
  xn = np.asarray(x)
  ref = (xn - xn.mean(1, keepdims=True)) / np.sqrt(xn.var(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(errors.ConfigError, match=r"feature_axes .* include axis 0"):
    InstanceNorm(2, feature_axes=0, rngs=nnx.Rngs(0))(x[:, :, :2])
  with pytest.raises(errors.ShapeError, match="expected 4 features"):
    InstanceNorm(4, rngs=nnx.Rngs(0))(x)


def test_norm_scale_and_bias_take_separate_keys_in_flax_order():
  rngs = nnx.Rngs(0)
  ln = LayerNorm(3, scale_init=initializers.normal(1.0), bias_init=initializers.normal(1.0),
                 rngs=rngs)
  ref = nnx.Rngs(0)
  k1, k2 = ref.params(), ref.params()
  close(ln.scale.value, jax.random.normal(k1, (3,)))
  close(ln.bias.value, jax.random.normal(k2, (3,)))


def test_norm_promote_dtype_and_metadata():
  seen = []

  def keep(arrays, dtype=None, inexact=True):
    seen.append(len(arrays))
    return arrays

  bn = BatchNorm(3, promote_dtype=keep, scale_metadata={"out_sharding": ("embed",)},
                 rngs=nnx.Rngs(0))
  bn(jnp.ones((2, 3)))
  assert seen == [5] and bn.scale.logical_axes == ("embed",)
  ln = LayerNorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert ln(jnp.ones((2, 3))).dtype == jnp.bfloat16
  gn = GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))
  mask = jnp.array([True, True, False, True])
  x = jnp.array([[1.0, 3.0, 100.0, 5.0]])
  y = gn(x, mask=mask)
  close(y[0, :2], [-1.0, 1.0], 1e-3)   # group 1: mean 2, var 1
  close(y[0, 3], 0.0, 1e-3)            # group 2 sees only the 5.0


def test_weight_norm_rewrites_the_kernel_to_scaled_unit_columns():
  from spmdnnx.nn import Linear, WeightNorm
  dense = Linear(4, 3, rngs=nnx.Rngs(0))
  wn = WeightNorm(dense, scale_init=initializers.constant(2.0), rngs=nnx.Rngs(1))
  assert set(wn.scales) == {("kernel",)} and wn.scales[("kernel",)].shape == (3,)
  x = jax.random.normal(jax.random.key(2), (5, 4))
  y = wn(x)
  kernel = np.asarray(dense.kernel.value)
  close(np.linalg.norm(kernel, axis=0), np.full(3, 2.0), 1e-5)
  close(y, np.asarray(x) @ kernel + np.asarray(dense.bias.value), 1e-5)
  no_scale = WeightNorm(Linear(4, 3, rngs=nnx.Rngs(0)), use_scale=False, feature_axes=None,
                        rngs=nnx.Rngs(1))
  no_scale(x)
  close(np.linalg.norm(np.asarray(no_scale.layer_instance.kernel.value)), 1.0, 1e-5)
  dense.extra = nnx.Param(jnp.ones((2, 2)))
  wn.variable_filter = lambda path, v: True
  with pytest.raises(errors.GraphError, match=r"WeightNorm: no scale for the parameter at "
                                              r"\('bias',\)"):
    wn(x)


def test_spectral_norm_divides_by_the_largest_singular_value():
  from spmdnnx.nn import Conv, Linear, SpectralNorm
  dense = Linear(4, 4, kernel_init=initializers.normal(3.0), rngs=nnx.Rngs(0))
  sn = SpectralNorm(dense, n_steps=30, rngs=nnx.Rngs(1))
  assert set(sn.batch_stats) == {("kernel", "u"), ("kernel", "sigma")}
  original = np.asarray(dense.kernel.value)
  sn(jnp.ones((1, 4)))
  close(np.linalg.norm(np.asarray(dense.kernel.value), ord=2), 1.0, 1e-3)
  close(sn.batch_stats[("kernel", "sigma")].value, np.linalg.norm(original, ord=2), 1e-3)
  u = np.asarray(sn.batch_stats[("kernel", "u")].value)
  sn(jnp.ones((1, 4)), update_stats=False)
  close(sn.batch_stats[("kernel", "u")].value, u)
  with pytest.raises(errors.ShapeError, match=r"SpectralNorm: the parameter at \('kernel',\) "
                                              r"has shape \(3, 2, 2\) \(3D\)"):
    SpectralNorm(Conv(2, 2, 3, rngs=nnx.Rngs(0)), error_on_non_matrix=True, rngs=nnx.Rngs(1))
  dense.kernel2 = nnx.Param(jnp.ones((4, 4)))
  with pytest.raises(errors.GraphError, match=r"no 'u' batch stat for the parameter at "
                                              r"\('kernel2',\)"):
    sn(jnp.ones((1, 4)))
