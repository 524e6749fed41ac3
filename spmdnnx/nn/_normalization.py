"""Normalization layers: `LayerNorm`, `RMSNorm`, `BatchNorm`, `GroupNorm`,
`InstanceNorm`, and the weight wrappers `WeightNorm` and `SpectralNorm`.

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

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from spmdnnx import errors
from spmdnnx._filters import PathContains, to_predicate
from spmdnnx._graph import iter_graph
from spmdnnx._module import Module
from spmdnnx._pytree import data
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx._rngs import Rngs
from spmdnnx._variables import BatchStat, Param, unbox

DEFAULT_NORM_AXES = ("norm",)
Axes = Sequence[str | None] | None


_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _stat_dtype(dtype: Any) -> Any:
  """Statistics are computed in at least float32 (float64 stays float64)."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.promote_types(dtype, jnp.float32)


def compute_stats(x: jax.Array, axes: tuple, *, use_mean: bool = True,
                  use_fast_variance: bool = True, axis_name: Any = None,
                  axis_index_groups: Any = None, mask: jax.Array | None = None,
                  dtype: Any = None):
  """Mean and (biased) variance of x over `axes` (kept as size-1 dims).

  Computed in at least float32 (``dtype``, the layer's compute dtype, may ask
  for more). With ``use_mean=False`` the mean is None (not subtracted) and the
  variance is ``E[x^2]`` (RMSNorm). `axis_name` averages the statistics across
  a named mapped axis.

  >>> mean, var = compute_stats(jnp.array([[1.0, 3.0]]), (1,))
  >>> mean.tolist(), var.tolist()
  ([[2.0]], [[1.0]])
  """
  x = x.astype(_stat_dtype(dtype if dtype is not None else x.dtype))
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
               param_shape: Sequence[int], scale: Any, bias: Any) -> jax.Array:
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
  80 s vs 3 s); with this order they grow linearly. It is also Flax's order,
  so results are bitwise Flax's. `RMSNorm` (no mean) computes
  ``x * (rsqrt(ms + eps) * scale)`` likewise.
  ``tests/nn/test_normalization.py`` guards the HLO growth, and
  ``bench/compile_depth.py`` measures it (docs/layers.md).
  """
  out_dtype = _common.canonicalize_dtype(x, scale, bias, dtype=layer.dtype)
  shape = tuple(param_shape)
  mul = lax.rsqrt(var + layer.epsilon)
  x = x.astype(var.dtype)
  if scale is not None:
    mul = mul * scale.astype(mul.dtype).reshape(shape)
  y = (x if mean is None else x - mean) * mul
  if bias is not None:
    y = y + bias.astype(y.dtype).reshape(shape)
  return y.astype(out_dtype)


def _param_shape(x: jax.Array, feature_axes: int | Sequence[int]) -> tuple:
  """Shape that broadcasts a per-feature parameter along `feature_axes` of x."""
  feature_axes = (feature_axes,) if isinstance(feature_axes, int) else feature_axes
  shape = [1] * x.ndim
  for a in feature_axes:
    shape[a] = x.shape[a]
  return tuple(shape)


def _axes(x: jax.Array, axes: int | Sequence[int]) -> tuple:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted({a % x.ndim for a in axes}))


def _check_input(layer: Any, x: jax.Array, feature_axes: tuple) -> None:
  got = tuple(x.shape[a] for a in feature_axes)
  if not got or math.prod(got) != layer.num_features:
    raise errors.ShapeError(
        f"{_common.layer_name(layer)}: expected {layer.num_features} features on "
        f"axis {feature_axes}, got an input of shape {tuple(x.shape)}; check "
        "num_features or the layer's feature axis.",
        shapes=[tuple(x.shape)], axes=feature_axes)


def _affine(layer: Any, x: jax.Array, *stats: Any) -> tuple:
  """(x, *stats, scale, bias) through the layer's ``promote_dtype``."""
  scale = layer.scale.value if layer.scale is not None else None
  bias = layer.bias.value if getattr(layer, "bias", None) is not None else None
  return layer.promote_dtype((x, *stats, scale, bias), dtype=layer.dtype)


def _init_affine(layer: Any, name: str, rngs: Rngs, use_scale: bool, use_bias: bool,
                 scale_init: Callable, bias_init: Callable, scale_axes: Axes,
                 bias_axes: Axes, scale_metadata: Any = None,
                 bias_metadata: Any = None) -> None:
  """Creates ``scale`` then ``bias``, each from its own ``rngs.params()`` key (Flax's order)."""
  _common.set_attrs(layer, scale=None, bias=None)
  shape = (layer.num_features,)

  def key():
    return rngs.params() if rngs is not None else jax.random.key(0)

  if use_scale:
    layer.scale = _common.make_param(name, "scale", scale_init, key(), shape,
                                     layer.param_dtype, scale_axes, DEFAULT_NORM_AXES,
                                     metadata=scale_metadata)
  if use_bias:
    layer.bias = _common.make_param(name, "bias", bias_init, key(), shape,
                                    layer.param_dtype, bias_axes, DEFAULT_NORM_AXES,
                                    metadata=bias_metadata)


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
    promote_dtype: ``f((x, scale, bias), dtype=...) -> tuple`` applied before
      the statistics (default: cast to ``dtype`` or the common dtype).
    scale_axes, bias_axes: logical axes (default ``("norm",)``).
    rngs: random streams (scale and bias each take a ``params`` key, as in
      Flax, though the default initializers do not use them).
    scale_metadata, bias_metadata: extra Param metadata (Flax's spelling).
  """

  _use_mean = True

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Callable = initializers.zeros,
               scale_init: Callable = initializers.ones,
               reduction_axes: int | Sequence[int] = -1,
               feature_axes: int | Sequence[int] = -1, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Callable = _common.promote_dtypes,
               scale_axes: Axes = None, bias_axes: Axes = None, rngs: Rngs | None = None,
               scale_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    name = type(self).__name__
    _common.check_positive(name, num_features=num_features)
    _common.set_attrs(self, num_features=num_features, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, reduction_axes=reduction_axes,
                      feature_axes=feature_axes, axis_name=axis_name,
                      axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance, promote_dtype=promote_dtype)
    _init_affine(self, name, rngs, use_scale, use_bias and self._use_mean,
                 scale_init, bias_init, scale_axes, bias_axes, scale_metadata,
                 bias_metadata)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    feature_axes = _axes(x, self.feature_axes)
    _check_input(self, x, feature_axes)
    axes = _axes(x, self.reduction_axes)
    x, scale, bias = _affine(self, x)
    mean, var = compute_stats(x, axes, use_mean=self._use_mean,
                              use_fast_variance=self.use_fast_variance,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups, mask=mask,
                              dtype=self.dtype)
    return _normalize(self, x, mean, var, _param_shape(x, feature_axes), scale, bias)


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
    axis_name, axis_index_groups, use_fast_variance, promote_dtype,
    scale_metadata, bias_metadata, rngs: as `LayerNorm` (``promote_dtype``
      also sees the running ``mean`` and ``var``).
    scale_axes, bias_axes, stats_axes: logical axes (default ``("norm",)``).

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
               promote_dtype: Callable = _common.promote_dtypes,
               scale_axes: Axes = None, bias_axes: Axes = None, stats_axes: Axes = None,
               rngs: Rngs | None = None,
               scale_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
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
                      use_fast_variance=use_fast_variance, promote_dtype=promote_dtype)
    shape = (num_features,)
    stats = _common.param_axes("BatchNorm", "stats", initializers.zeros, stats_axes,
                               DEFAULT_NORM_AXES, shape)
    self.mean = BatchStat(jnp.zeros(shape, jnp.float32), logical_axes=stats)
    self.var = BatchStat(jnp.ones(shape, jnp.float32), logical_axes=stats)
    _init_affine(self, "BatchNorm", rngs, use_scale, use_bias, scale_init, bias_init,
                 scale_axes, bias_axes, scale_metadata, bias_metadata)

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Sets the layer's default mode (used by ``nnx.view``).

    Args:
      use_running_average: True normalizes with the stored statistics
        (evaluation); False with the batch's (training); None keeps it.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    if use_running_average is None:
      use_running_average = self.use_running_average
    feature_axes = _axes(x, self.axis)
    _check_input(self, x, feature_axes)
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    shape = [1] * x.ndim
    shape[feature_axes[0]] = self.num_features
    x, mean, var, scale, bias = _affine(self, x, self.mean.value, self.var.value)
    if use_running_average:
      mean, var = mean.reshape(shape), var.reshape(shape)
    else:
      mean, var = compute_stats(x, axes, use_fast_variance=self.use_fast_variance,
                                axis_name=self.axis_name,
                                axis_index_groups=self.axis_index_groups, mask=mask,
                                dtype=self.dtype)
      m, n = self.momentum, self.num_features
      self.mean.value = (m * self.mean.value + (1 - m) * mean.reshape(n)).astype(
          self.mean.dtype)
      self.var.value = (m * self.var.value + (1 - m) * var.reshape(n)).astype(
          self.var.dtype)
    return _normalize(self, x, mean, var, _param_shape(x, feature_axes), scale, bias)


class GroupNorm(Module):
  """Normalizes groups of features per example (all non-batch axes).

  Args:
    num_features: size of the (last) feature axis.
    num_groups: number of groups (give this or group_size).
    group_size: features per group (give this or num_groups).
    epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
    axis_name, axis_index_groups, use_fast_variance, promote_dtype,
    scale_metadata, bias_metadata, rngs: as `LayerNorm`.
    reduction_axes: axes statistics are taken over (default: all but the first);
      must include the last axis.
    scale_axes, bias_axes: logical axes (default ``("norm",)``).

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
               promote_dtype: Callable = _common.promote_dtypes,
               scale_axes: Axes = None, bias_axes: Axes = None, rngs: Rngs | None = None,
               scale_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
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
                      use_fast_variance=use_fast_variance, promote_dtype=promote_dtype)
    _init_affine(self, "GroupNorm", rngs, use_scale, use_bias, scale_init, bias_init,
                 scale_axes, bias_axes, scale_metadata, bias_metadata)

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
    x, scale, bias = _affine(self, x)
    g = self.num_groups
    grouped = x.reshape(x.shape[:-1] + (g, self.group_size))
    g_axes = tuple(a if a < x.ndim - 1 else x.ndim for a in axes)
    if mask is not None:
      mask = jnp.reshape(mask, jnp.shape(mask)[:-1] + (g, self.group_size))
    mean, var = compute_stats(grouped, g_axes, use_fast_variance=self.use_fast_variance,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups, mask=mask,
                              dtype=self.dtype)
    shape = (1,) * (x.ndim - 1) + (g, self.group_size)
    return _normalize(self, grouped, mean, var, shape, scale, bias).reshape(x.shape)


class InstanceNorm(Module):
  """Normalizes each example and each feature over the remaining (spatial) axes.

  Axis 0 is the batch axis; statistics are taken over every axis that is
  neither the batch nor a feature axis.

  Args:
    num_features: number of features (product of the feature axes' sizes).
    feature_axes: the feature axis or axes (default -1); may not include 0.
    epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
    axis_name, axis_index_groups, use_fast_variance, promote_dtype,
    scale_axes, bias_axes, rngs, scale_metadata, bias_metadata: as `LayerNorm`.

  Raises:
    ConfigError: when the feature axes include the batch axis 0.
    ShapeError: when the feature axes do not hold num_features entries.

  >>> from spmdnnx._rngs import Rngs
  >>> y = InstanceNorm(2, rngs=Rngs(0))(jnp.arange(12.0).reshape(1, 6, 2))
  >>> bool(jnp.allclose(y.mean(1), 0.0, atol=1e-5)), y.shape
  (True, (1, 6, 2))
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Callable = initializers.zeros,
               scale_init: Callable = initializers.ones,
               feature_axes: int | Sequence[int] = -1, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype: Callable = _common.promote_dtypes,
               scale_axes: Axes = None, bias_axes: Axes = None, rngs: Rngs | None = None,
               scale_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    _common.check_positive("InstanceNorm", num_features=num_features)
    _common.set_attrs(self, num_features=num_features, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, feature_axes=feature_axes,
                      axis_name=axis_name, axis_index_groups=axis_index_groups,
                      use_fast_variance=use_fast_variance, promote_dtype=promote_dtype)
    _init_affine(self, "InstanceNorm", rngs, use_scale, use_bias, scale_init, bias_init,
                 scale_axes, bias_axes, scale_metadata, bias_metadata)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    feature_axes = _axes(x, self.feature_axes)
    if 0 in feature_axes:
      raise errors.ConfigError(
          f"{_common.layer_name(self)}: feature_axes {self.feature_axes} include axis 0, "
          "which InstanceNorm treats as the batch axis; move the features elsewhere "
          "(e.g. feature_axes=-1).", axes=feature_axes, shapes=[tuple(x.shape)])
    _check_input(self, x, feature_axes)
    axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
    x, scale, bias = _affine(self, x)
    mean, var = compute_stats(x, axes, use_fast_variance=self.use_fast_variance,
                              axis_name=self.axis_name,
                              axis_index_groups=self.axis_index_groups, mask=mask,
                              dtype=self.dtype)
    return _normalize(self, x, mean, var, _param_shape(x, feature_axes), scale, bias)


def _l2_normalize(x: jax.Array, axis: Any = None, eps: float = 1e-12) -> jax.Array:
  return x * lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def _params_of(layer: Module) -> list:
  """``(path, Param)`` for every live Param of `layer` (first path of shared ones)."""
  return [(path, v) for path, v in iter_graph(layer) if isinstance(v, Param)]


def _missing(owner: str, what: str, path: tuple) -> errors.GraphError:
  return errors.GraphError(
      f"{owner}: no {what} for the parameter at {path!r}; the wrapped layer's "
      "parameters changed after the wrapper was created. Create the wrapper again.",
      paths=[path])


class WeightNorm(Module):
  """Reparameterizes a layer's weights as ``scale * w / ||w||`` before each call.

  On every call the matching Params of ``layer_instance`` are overwritten, in
  place, by their L2-normalized values (norm over all axes but
  ``feature_axes``), times a learned per-feature scale kept in ``scales``
  (a dict keyed by the Param's path inside the layer).

  Args:
    layer_instance: the wrapped Module.
    feature_axes: axes that keep their own norm (None: one norm per Param).
    use_scale: learn a scale per feature (``scales``).
    scale_init: initializer of the scales (called with a ``params`` key).
    epsilon: added inside the square root.
    dtype: dtype of the rewritten Params (None: their common dtype with the scale).
    param_dtype: accepted for Flax compatibility.
    variable_filter: which Params to rewrite (default: paths containing ``kernel``).
    promote_dtype: accepted for Flax compatibility.
    rngs: random streams.

  Raises:
    GraphError: when the layer's Params changed after construction.

  >>> from spmdnnx._rngs import Rngs
  >>> from spmdnnx.nn._linear import Linear
  >>> wn = WeightNorm(Linear(3, 2, rngs=Rngs(0)), rngs=Rngs(1))
  >>> _ = wn(jnp.ones((1, 3)))
  >>> jnp.linalg.norm(wn.layer_instance.kernel.value, axis=0).round(4)
  Array([1., 1.], dtype=float32)
  """

  def __init__(self, layer_instance: Module, *, feature_axes: Any = -1,
               use_scale: bool = True, scale_init: Callable = initializers.ones,
               epsilon: float = 1e-12, dtype: Any = None, param_dtype: Any = jnp.float32,
               variable_filter: Any = None,
               promote_dtype: Callable = _common.promote_dtypes, rngs: Rngs):
    chosen = PathContains("kernel") if variable_filter is None else variable_filter
    _common.set_attrs(self, layer_instance=layer_instance,
                      feature_axes=() if feature_axes is None else feature_axes,
                      use_scale=use_scale, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, variable_filter=to_predicate(chosen),
                      promote_dtype=promote_dtype)
    scales = None
    if use_scale:
      scales = {}
      for path, param in _params_of(layer_instance):
        if self.variable_filter(path, param):
          axes = _axes_of(param.ndim, self.feature_axes)
          scales[path] = unbox(scale_init(rngs.params(), tuple(param.shape[a] for a in axes),
                                          param_dtype))
    self.scales = data(scales)

  def _normalize_param(self, path: tuple, param: Param) -> None:
    value = param.value
    axes = _axes_of(value.ndim, self.feature_axes)
    reduce = tuple(a for a in range(value.ndim) if a not in axes)
    new = _l2_normalize(value, axis=reduce, eps=self.epsilon)
    cast = [value]
    if self.use_scale:
      if path not in self.scales:
        raise _missing("WeightNorm", "scale", path)
      scale = jnp.asarray(self.scales[path])
      shape = [1] * value.ndim
      for a in axes:
        shape[a] = value.shape[a]
      with jax.numpy_dtype_promotion("standard"):
        new = new * scale.reshape(shape)
      cast.append(scale)
    param.value = jnp.asarray(new, _common.canonicalize_dtype(*cast, dtype=self.dtype))

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    for path, param in _params_of(self.layer_instance):
      if self.variable_filter(path, param):
        self._normalize_param(path, param)
    return self.layer_instance(x, *args, **kwargs)


def _axes_of(ndim: int, axes: Any) -> tuple:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted({a % ndim for a in axes}))


class SpectralNorm(Module):
  """Divides a layer's weight matrices by their largest singular value before each call.

  The singular value is estimated by power iteration; its state (``u`` and
  ``sigma`` for each Param of rank >= 2, as `BatchStat`s) lives in
  ``batch_stats``, keyed by the Param's path plus ``"u"``/``"sigma"``. Params
  of rank > 2 are flattened to ``(-1, last_dim)``.

  Args:
    layer_instance: the wrapped Module.
    n_steps: power iterations per call (0: no normalization).
    epsilon: added when normalizing vectors.
    dtype: dtype of the rewritten Params (None: their common dtype).
    param_dtype: dtype of ``u`` and ``sigma``.
    error_on_non_matrix: raise on Params of rank > 2 instead of flattening.
    update_stats: default of the call argument (store the new ``u``/``sigma``).
    rngs: random streams (``u`` starts from a normal draw per Param).

  Raises:
    ShapeError: for a rank > 2 Param when ``error_on_non_matrix``.
    GraphError: when the layer's Params changed after construction.

  >>> from spmdnnx._rngs import Rngs
  >>> from spmdnnx.nn._linear import Linear
  >>> sn = SpectralNorm(Linear(3, 3, rngs=Rngs(0)), n_steps=20, rngs=Rngs(1))
  >>> _ = sn(jnp.ones((1, 3)))
  >>> float(jnp.linalg.norm(sn.layer_instance.kernel.value, ord=2).round(3))
  1.0
  """

  def __init__(self, layer_instance: Module, *, n_steps: int = 1, epsilon: float = 1e-12,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               error_on_non_matrix: bool = False, update_stats: bool = True, rngs: Rngs):
    _common.set_attrs(self, layer_instance=layer_instance, n_steps=n_steps,
                      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      error_on_non_matrix=error_on_non_matrix,
                      use_running_average=not update_stats)
    stats = {}
    for path, param in _params_of(layer_instance):
      matrix = self._as_matrix(path, param.value)
      if matrix is None:
        continue
      key = rngs.params()
      stats[path + ("u",)] = BatchStat(
          initializers.normal()(key, (1, matrix.shape[-1]), param_dtype))
      stats[path + ("sigma",)] = BatchStat(initializers.ones(key, (), param_dtype))
    self.batch_stats = data(stats)

  def _as_matrix(self, path: tuple, value: jax.Array) -> jax.Array | None:
    if value.ndim <= 1 or self.n_steps < 1:
      return None
    if value.ndim > 2:
      if self.error_on_non_matrix:
        raise errors.ShapeError(
            f"SpectralNorm: the parameter at {path!r} has shape {tuple(value.shape)} "
            f"({value.ndim}D) and error_on_non_matrix=True; pass "
            "error_on_non_matrix=False to flatten it to (-1, last_dim).",
            paths=[path], shapes=[tuple(value.shape)])
      value = jnp.reshape(value, (-1, value.shape[-1]))
    return value

  def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
    if update_stats is None:
      update_stats = not self.use_running_average
    for path, param in _params_of(self.layer_instance):
      self._normalize_param(path, param, update_stats)
    return self.layer_instance(x)

  def _normalize_param(self, path: tuple, param: Param, update_stats: bool) -> None:
    matrix = self._as_matrix(path, param.value)
    if matrix is None:
      return
    for stat in ("u", "sigma"):
      if path + (stat,) not in self.batch_stats:
        raise _missing("SpectralNorm", f"{stat!r} batch stat", path)
    u = self.batch_stats[path + ("u",)].value
    with jax.numpy_dtype_promotion("standard"):
      for _ in range(self.n_steps):
        v = _l2_normalize(jnp.matmul(u, matrix.T), eps=self.epsilon)
        u = _l2_normalize(jnp.matmul(v, matrix), eps=self.epsilon)
      u, v = lax.stop_gradient(u), lax.stop_gradient(v)
      sigma = jnp.matmul(jnp.matmul(v, matrix), u.T)[0, 0]
      matrix = matrix / jnp.where(sigma != 0, sigma, 1)
    if update_stats:
      self.batch_stats[path + ("u",)].value = u
      self.batch_stats[path + ("sigma",)].value = sigma
    dtype = _common.canonicalize_dtype(matrix, u, v, sigma, dtype=self.dtype)
    param.value = jnp.asarray(matrix.reshape(param.value.shape), dtype)
