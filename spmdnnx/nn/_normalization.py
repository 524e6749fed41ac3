"""Normalization layers: `LayerNorm`, `RMSNorm`, `BatchNorm`, `GroupNorm`.

Statistics are computed in at least float32 whatever the input dtype; the
result is cast to ``dtype`` (None: the common dtype of input and params).
Scales and biases are annotated ``("norm",)`` by default; BatchNorm's running
``mean``/``var`` are `BatchStat`s with the same axes.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> ln = LayerNorm(4, rngs=Rngs(0))
>>> y = ln(jnp.arange(8.0).reshape(2, 4))
>>> bool(jnp.allclose(y.mean(-1), 0.0, atol=1e-6)), y.shape
(True, (2, 4))
>>> ln.scale.logical_axes
('norm',)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx._rngs import Rngs
from spmdnnx._variables import BatchStat

DEFAULT_NORM_AXES = ("norm",)
Axes = Sequence[str | None] | None


def _stat_dtype(dtype: Any) -> Any:
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def compute_stats(x: jax.Array, axes: tuple, *, use_mean: bool = True,
                  use_fast_variance: bool = True, axis_name: Any = None,
                  axis_index_groups: Any = None, mask: jax.Array | None = None):
  """Mean and (biased) variance of x over `axes` (kept as size-1 dims).

  Computed in at least float32. With ``use_mean=False`` the mean is None (not
  subtracted) and the variance is ``E[x^2]`` (RMSNorm). `axis_name` averages
  the statistics across a named mapped axis.

  >>> mean, var = compute_stats(jnp.array([[1.0, 3.0]]), (1,))
  >>> mean.tolist(), var.tolist()
  ([[2.0]], [[1.0]])
  """
  x = x.astype(_stat_dtype(x.dtype))
  square = jnp.square(x)   # squared before x is first reduced: see _normalize

  def mean(v):
    m = jnp.mean(v, axes, where=mask, keepdims=True)
    if axis_name is not None:
      m = lax.pmean(m, axis_name, axis_index_groups=axis_index_groups)
    return m

  if not use_mean:
    return None, mean(square)
  mu = mean(x)
  if use_fast_variance:
    var = jnp.maximum(mean(square) - jnp.square(mu), 0.0)
  else:
    var = mean(jnp.square(x - mu))
  return mu, var


def _normalize(layer: Any, x: jax.Array, mean: jax.Array, var: jax.Array,
               param_shape: Sequence[int]) -> jax.Array:
  """``(x - mean) * (rsqrt(var + eps) * scale) + bias``, cast to the output dtype.

  The formulation (with `compute_stats` squaring ``x`` before its first
  reduction) is chosen for compile time, not numerics: XLA:CPU duplicates
  cheap elementwise producers into every fusion that can absorb them, so in
  an unrolled stack of ``x + norm(x)`` blocks the residual stream and its
  cotangent are recomputed from the first block inside each later fusion
  unless some consumer cannot fuse them (a reduction over more than 32
  elements becomes a non-fusible reduce-window) and the fusion pass's
  order-dependent analysis keeps that value materialized. With the
  textbook order, ``((x - mean) * rsqrt(var + eps)) * scale``, the grad step's
  HLO and compile time grow quadratically with depth (32 LayerNorm blocks:
  80 s vs 3 s); with this order they grow linearly. `RMSNorm` (no mean)
  keeps ``x * rsqrt(ms + eps) * scale``, the order that is linear for it.
  ``tests/nn/test_normalization.py`` guards the HLO growth, and
  ``bench/compile_depth.py`` measures it (docs/layers.md).
  """
  scale = layer.scale.value if layer.scale is not None else None
  bias = layer.bias.value if layer.bias is not None else None
  out_dtype = layer.dtype or _common.result_dtype(x, scale, bias)
  shape = tuple(param_shape)
  mul = lax.rsqrt(var + layer.epsilon)
  x = x.astype(var.dtype)
  if mean is None:
    y = x * mul
    if scale is not None:
      y = y * scale.astype(y.dtype).reshape(shape)
  else:
    if scale is not None:
      mul = mul * scale.astype(mul.dtype).reshape(shape)
    y = (x - mean) * mul
  if bias is not None:
    y = y + bias.astype(y.dtype).reshape(shape)
  return y.astype(out_dtype)


def _param_shape(x: jax.Array, feature_axis: int) -> tuple:
  """Shape that broadcasts a per-feature parameter along `feature_axis` of x."""
  shape = [1] * x.ndim
  shape[feature_axis] = x.shape[feature_axis]
  return tuple(shape)


def _axes(x: jax.Array, axes: int | Sequence[int]) -> tuple:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % x.ndim for a in axes))


def _check_input(layer: Any, x: jax.Array, feature_axes: tuple) -> None:
  got = tuple(x.shape[a] for a in feature_axes)
  if len(got) != 1 or got[0] != layer.num_features:
    raise errors.ShapeError(
        f"{_common.layer_name(layer)}: expected {layer.num_features} features on "
        f"axis {feature_axes}, got an input of shape {tuple(x.shape)}; check "
        "num_features or the layer's feature axis.",
        shapes=[tuple(x.shape)], axes=feature_axes)


def _init_affine(layer: Any, name: str, rngs: Rngs, use_scale: bool, use_bias: bool,
                 scale_init: Callable, bias_init: Callable, scale_axes: Axes,
                 bias_axes: Axes) -> None:
  _common.set_attrs(layer, scale=None, bias=None)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  shape = (layer.num_features,)
  if use_scale:
    layer.scale = _common.make_param(name, "scale", scale_init, key, shape,
                                     layer.param_dtype, scale_axes, DEFAULT_NORM_AXES)
  if use_bias:
    layer.bias = _common.make_param(name, "bias", bias_init, key, shape,
                                    layer.param_dtype, bias_axes, DEFAULT_NORM_AXES)


class LayerNorm(Module):
  """Normalizes each example over its feature axis, then scales and shifts.

  Args:
    num_features: size of the feature axis.
    epsilon: added to the variance.
    dtype: output dtype (None: common dtype of input and params).
    param_dtype: storage dtype of scale and bias.
    use_bias, use_scale: whether to learn a shift / scale.
    bias_init, scale_init: initializers.
    reduction_axes: axes the statistics are taken over (default -1).
    feature_axes: axis holding the features (default -1).
    axis_name, axis_index_groups: average statistics over a mapped axis.
    use_fast_variance: ``E[x^2] - E[x]^2`` instead of ``E[(x - E[x])^2]``.
    scale_axes, bias_axes: logical axes (default ``("norm",)``).
    rngs: accepted for API compatibility (norm params are not random).
  """

  _use_mean = True

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Callable = initializers.zeros,
               scale_init: Callable = initializers.ones,
               reduction_axes: int | Sequence[int] = -1,
               feature_axes: int | Sequence[int] = -1, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               scale_axes: Axes = None, bias_axes: Axes = None, rngs: Rngs | None = None):
    name = type(self).__name__
    _common.check_positive(name, num_features=num_features)
    _common.set_attrs(self, num_features=num_features, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, reduction_axes=reduction_axes,
                      feature_axes=feature_axes, axis_name=axis_name,
                      axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance)
    _init_affine(self, name, rngs, use_scale, use_bias and self._use_mean,
                 scale_init, bias_init, scale_axes, bias_axes)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    feature_axes = _axes(x, self.feature_axes)
    _check_input(self, x, feature_axes)
    axes = _axes(x, self.reduction_axes)
    mean, var = compute_stats(x, axes, use_mean=self._use_mean,
                              use_fast_variance=self.use_fast_variance,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups, mask=mask)
    return _normalize(self, x, mean, var, _param_shape(x, feature_axes[0]))


class RMSNorm(LayerNorm):
  """Scales each example by the reciprocal root-mean-square of its features.

  Same arguments as `LayerNorm` (``use_bias`` is ignored: there is no shift).

  >>> from spmdnnx._rngs import Rngs
  >>> y = RMSNorm(2, rngs=Rngs(0))(jnp.array([[3.0, 4.0]]))
  >>> bool(jnp.allclose(y, jnp.array([[3.0, 4.0]]) / jnp.sqrt(12.5)))
  True
  """

  _use_mean = False


class BatchNorm(Module):
  """Normalizes over the batch (all axes but the feature axis).

  Training (``use_running_average=False``) uses the batch statistics and
  updates the running ``mean``/``var`` (`BatchStat`s) with ``momentum``;
  evaluation uses the running statistics. The mode is an attribute (set by
  ``model.train()``/``model.eval()``) or a call argument, which wins.

  Args:
    num_features: size of the feature axis.
    use_running_average: default mode (see above).
    axis: the feature axis.
    momentum: decay of the running statistics.
    epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
    axis_name, axis_index_groups, use_fast_variance: as `LayerNorm`.
    scale_axes, bias_axes, stats_axes: logical axes (default ``("norm",)``).
    rngs: accepted for API compatibility.

  >>> from spmdnnx._rngs import Rngs
  >>> bn = BatchNorm(3, rngs=Rngs(0))
  >>> y = bn(jnp.ones((4, 3)))
  >>> bn.mean.value.round(3)
  Array([0.01, 0.01, 0.01], dtype=float32)
  """

  def __init__(self, num_features: int, *, use_running_average: bool = False,
               axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-5,
               dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Callable = initializers.zeros,
               scale_init: Callable = initializers.ones, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               scale_axes: Axes = None, bias_axes: Axes = None, stats_axes: Axes = None,
               rngs: Rngs | None = None):
    _common.check_positive("BatchNorm", num_features=num_features)
    if not 0.0 <= momentum <= 1.0:
      raise errors.ConfigError(
          f"BatchNorm: momentum must be in [0, 1], got {momentum}; typical values "
          "are 0.9 or 0.99.", argument="momentum", value=momentum)
    _common.set_attrs(self, num_features=num_features,
                      use_running_average=use_running_average, axis=axis,
                      momentum=momentum, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, axis_name=axis_name,
                      axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance)
    shape = (num_features,)
    stats = _common.param_axes("BatchNorm", "stats", initializers.zeros, stats_axes,
                               DEFAULT_NORM_AXES, shape)
    self.mean = BatchStat(jnp.zeros(shape, jnp.float32), logical_axes=stats)
    self.var = BatchStat(jnp.ones(shape, jnp.float32), logical_axes=stats)
    _init_affine(self, "BatchNorm", rngs, use_scale, use_bias, scale_init, bias_init,
                 scale_axes, bias_axes)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    if use_running_average is None:
      use_running_average = self.use_running_average
    feature_axes = _axes(x, self.axis)
    _check_input(self, x, feature_axes)
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    shape = [1] * x.ndim
    shape[feature_axes[0]] = self.num_features
    if use_running_average:
      mean, var = self.mean.value.reshape(shape), self.var.value.reshape(shape)
    else:
      mean, var = compute_stats(x, axes, use_fast_variance=self.use_fast_variance,
                                axis_name=self.axis_name,
                                axis_index_groups=self.axis_index_groups, mask=mask)
      m, n = self.momentum, self.num_features
      self.mean.value = (m * self.mean.value + (1 - m) * mean.reshape(n)).astype(
          self.mean.dtype)
      self.var.value = (m * self.var.value + (1 - m) * var.reshape(n)).astype(
          self.var.dtype)
    return _normalize(self, x, mean, var, _param_shape(x, feature_axes[0]))


class GroupNorm(Module):
  """Normalizes groups of features per example (all non-batch axes).

  Args:
    num_features: size of the (last) feature axis.
    num_groups: number of groups (give this or group_size).
    group_size: features per group (give this or num_groups).
    epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
    axis_name, axis_index_groups, use_fast_variance: as `LayerNorm`.
    reduction_axes: axes statistics are taken over (default: all but the first);
      must include the last axis.
    scale_axes, bias_axes: logical axes (default ``("norm",)``).
    rngs: accepted for API compatibility.

  Raises:
    ConfigError: when groups do not divide num_features, or both/neither of
      num_groups and group_size are given.

  >>> from spmdnnx._rngs import Rngs
  >>> GroupNorm(4, num_groups=2, rngs=Rngs(0))(jnp.ones((2, 3, 4))).shape
  (2, 3, 4)
  """

  def __init__(self, num_features: int, num_groups: int | None = 32,
               group_size: int | None = None, *, epsilon: float = 1e-6, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Callable = initializers.zeros,
               scale_init: Callable = initializers.ones,
               reduction_axes: Sequence[int] | None = None, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               scale_axes: Axes = None, bias_axes: Axes = None, rngs: Rngs | None = None):
    _common.check_positive("GroupNorm", num_features=num_features)
    if (num_groups is None) == (group_size is None):
      raise errors.ConfigError(
          "GroupNorm: give exactly one of num_groups and group_size (got "
          f"num_groups={num_groups}, group_size={group_size}).",
          argument="num_groups", value=(num_groups, group_size))
    if group_size is not None:
      _common.check_positive("GroupNorm", group_size=group_size)
      if num_features % group_size:
        raise errors.ConfigError(
            f"GroupNorm: group_size {group_size} must divide num_features "
            f"{num_features}.", argument="group_size", value=group_size)
      num_groups = num_features // group_size
    _common.check_positive("GroupNorm", num_groups=num_groups)
    if num_features % num_groups:
      raise errors.ConfigError(
          f"GroupNorm: num_groups {num_groups} must divide num_features "
          f"{num_features}; pick a divisor (or group_size=...).",
          argument="num_groups", value=num_groups)
    _common.set_attrs(self, num_features=num_features, num_groups=num_groups,
                      group_size=num_features // num_groups, epsilon=epsilon,
                      dtype=dtype, param_dtype=param_dtype,
                      reduction_axes=reduction_axes, axis_name=axis_name,
                      axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance)
    _init_affine(self, "GroupNorm", rngs, use_scale, use_bias, scale_init, bias_init,
                 scale_axes, bias_axes)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    _check_input(self, x, (x.ndim - 1,))
    if self.reduction_axes is None:
      axes = tuple(range(1, x.ndim))
    else:
      axes = _axes(x, self.reduction_axes)
      if x.ndim - 1 not in axes:
        raise errors.ConfigError(
            f"GroupNorm: reduction_axes {self.reduction_axes} must include the "
            "feature axis -1.", axes=axes, shapes=[tuple(x.shape)])
    g = self.num_groups
    grouped = x.reshape(x.shape[:-1] + (g, self.group_size))
    g_axes = tuple(a if a < x.ndim - 1 else x.ndim for a in axes)
    if mask is not None:
      mask = mask.reshape(grouped.shape)
    mean, var = compute_stats(grouped, g_axes, use_fast_variance=self.use_fast_variance,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups, mask=mask)
    shape = (1,) * (x.ndim - 1) + (g, self.group_size)
    return _normalize(self, grouped, mean, var, shape).reshape(x.shape)
