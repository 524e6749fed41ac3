"""Convolutions over 1-3 spatial dimensions: `Conv` and `ConvTranspose`.

Inputs are channels-last: ``(*batch, *spatial, features)``; an input with no
batch axis is accepted too. Kernels have shape
``(*kernel_size, in_features // feature_group_count, out_features)``. Both are
generic layers: unannotated unless ``kernel_axes`` (or `with_partitioning`)
names the axes.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> conv = Conv(3, 8, kernel_size=(3, 3), rngs=Rngs(0))
>>> conv(jnp.ones((2, 16, 16, 3))).shape
(2, 16, 16, 8)
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx._rngs import Rngs

_DEFAULT_KERNEL_INIT = initializers.default_kernel_init()
PADDING_STRINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def canonical_padding(owner: str, padding: Any, n: int) -> str | tuple:
  """Validates a padding spec; returns a string or n (low, high) pairs.

  Raises:
    ConfigError: for an unknown string or malformed explicit padding.
  """
  if isinstance(padding, str):
    if padding.upper() not in PADDING_STRINGS:
      raise errors.ConfigError(
          f"{owner}: padding {padding!r} is not one of {PADDING_STRINGS}; pass one "
          "of those strings, an int, or a sequence of (low, high) pairs.",
          argument="padding", value=padding)
    padding = padding.upper()
    if padding == "CAUSAL" and n != 1:
      raise errors.ConfigError(
          f"{owner}: padding 'CAUSAL' only applies to 1 spatial dimension, the "
          f"kernel has {n}; pad explicitly with (low, high) pairs instead.",
          argument="padding", value=padding)
    return padding
  if isinstance(padding, int) and not isinstance(padding, bool):
    padding = [(padding, padding)] * n
  try:
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  except TypeError:
    pairs = None
  if (pairs is None or len(pairs) != n or
      not all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs)):
    raise errors.ConfigError(
        f"{owner}: explicit padding {padding!r} must be an int or {n} ints or "
        f"(low, high) int pairs, one per spatial dimension.",
        argument="padding", value=padding)
  return pairs


def _kernel_size(owner: str, kernel_size: Any) -> tuple:
  if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
    kernel_size = (kernel_size,)
  kernel_size = tuple(kernel_size)
  if not 1 <= len(kernel_size) <= 3:
    raise errors.ConfigError(
        f"{owner}: kernel_size {kernel_size} must have 1 to 3 entries (one per "
        "spatial dimension).", argument="kernel_size", value=kernel_size)
  return _common.canonical_tuple(owner, "kernel_size", kernel_size, len(kernel_size))


def _flatten_batch(layer: Any, x: jax.Array, n: int, features: int, axis_what: str):
  """Reshapes (*batch, *spatial, C) to (B, *spatial, C); returns the batch shape."""
  if jnp.ndim(x) < n + 1:
    raise errors.ShapeError(
        f"{_common.layer_name(layer)}: expected an input of shape (*batch, "
        f"{n} spatial dims, {features}), got shape {tuple(jnp.shape(x))}.",
        shapes=[tuple(jnp.shape(x))])
  _common.check_features(layer, x, -1, features, axis_what)
  batch = x.shape[:x.ndim - n - 1]
  return x.reshape((math.prod(batch),) + x.shape[x.ndim - n - 1:]), batch


def _operands(layer: Any, inputs: jax.Array, n: int) -> tuple:
  """Shared call prelude: (x with one batch dim, batch shape, masked kernel, bias),
  promoted to the layer's compute dtype."""
  x, batch = _flatten_batch(layer, inputs, n, layer.in_features, "in features")
  bias = layer.bias.value if layer.bias is not None else None
  kernel = layer.kernel.value
  if layer.mask is not None:
    mask = jnp.asarray(layer.mask)
    with jax.numpy_dtype_promotion("standard"):
      kernel = kernel * mask
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  return x, batch, kernel, bias


def _tuple_or_one(owner: str, name: str, value: Any, n: int) -> tuple:
  """Like `_common.canonical_tuple`, with None meaning 1 (Flax's sentinel)."""
  return _common.canonical_tuple(owner, name, 1 if value is None else value, n)


def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
  spatial = "DHW"[3 - n:]
  return lax.conv_dimension_numbers(
      (1,) * (n + 2), (1,) * (n + 2), (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))


class Conv(Module):
  """An N-d convolution (N = len(kernel_size)), channels last.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: an int (1-d) or a tuple of 1-3 ints.
    strides: int or tuple, the window stride.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'CAUSAL' (1-d), an int, or a
      sequence of ints / (low, high) pairs per spatial dimension.
    input_dilation: int or tuple, dilation of the input (strided transpose).
    kernel_dilation: int or tuple, dilation of the kernel (atrous conv).
    feature_group_count: groups; in and out features must be divisible by it.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
    promote_dtype, preferred_element_type, kernel_metadata, bias_metadata: as
      `Linear`.
    mask: optional array multiplied into the kernel (e.g. masked convs).
    conv_general_dilated: the convolution op (default
      `jax.lax.conv_general_dilated`).
    kernel_axes, bias_axes: logical axes (default: unannotated; the bias takes
      the kernel's last axis name).
    rngs: random streams.

  'REFLECT' padding mirrors the input across its edges; 'CIRCULAR' wraps it.
  Call with ``out_sharding=`` on an explicit-axes mesh to choose the output's
  sharding.

  Raises:
    ConfigError: bad sizes, padding, strides, or group counts.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] | None = 1, *, padding: Any = "SAME",
               input_dilation: int | Sequence[int] | None = 1,
               kernel_dilation: int | Sequence[int] | None = 1, feature_group_count: int = 1,
               use_bias: bool = True, mask: jax.Array | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable = _DEFAULT_KERNEL_INIT,
               bias_init: Callable = initializers.zeros,
               conv_general_dilated: Callable = lax.conv_general_dilated,
               promote_dtype: Callable = _common.promote_dtypes,
               preferred_element_type: Any = None,
               kernel_axes: Sequence[str | None] | None = None,
               bias_axes: Sequence[str | None] | None = None, rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    name = type(self).__name__
    _common.check_positive(name, in_features=in_features, out_features=out_features,
                           feature_group_count=feature_group_count)
    ks = _kernel_size(name, kernel_size)
    n = len(ks)
    if in_features % feature_group_count or out_features % feature_group_count:
      raise errors.ConfigError(
          f"{name}: in_features ({in_features}) and out_features ({out_features}) "
          f"must both be divisible by feature_group_count ({feature_group_count}).",
          argument="feature_group_count", value=feature_group_count)
    shape = ks + (in_features // feature_group_count, out_features)
    if mask is not None and tuple(mask.shape) != shape:
      raise errors.ConfigError(
          f"{name}: mask shape {tuple(mask.shape)} must equal the kernel shape {shape}.",
          shapes=[tuple(mask.shape), shape])
    _common.set_attrs(
        self, in_features=in_features, out_features=out_features, kernel_size=ks,
        strides=_tuple_or_one(name, "strides", strides, n),
        padding=canonical_padding(name, padding, n),
        input_dilation=_tuple_or_one(name, "input_dilation", input_dilation, n),
        kernel_dilation=_tuple_or_one(name, "kernel_dilation", kernel_dilation, n),
        feature_group_count=feature_group_count, use_bias=use_bias, mask=mask,
        dtype=dtype, param_dtype=param_dtype, precision=precision, bias=None,
        kernel_shape=shape, conv_general_dilated=conv_general_dilated,
        promote_dtype=promote_dtype, preferred_element_type=preferred_element_type)
    self.kernel = _common.make_param(name, "kernel", kernel_init, rngs.params(), shape,
                                     param_dtype, kernel_axes, metadata=kernel_metadata)
    if use_bias:
      default = None if self.kernel.logical_axes is None else self.kernel.logical_axes[-1:]
      self.bias = _common.make_param(name, "bias", bias_init, rngs.params(),
                                     (out_features,), param_dtype, bias_axes, default,
                                     metadata=bias_metadata)

  def _padding(self, x: jax.Array) -> tuple[jax.Array, Any]:
    pad = self.padding
    dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
    if pad in ("CIRCULAR", "REFLECT"):
      widths = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
      mode = "wrap" if pad == "CIRCULAR" else "reflect"
      return jnp.pad(x, widths, mode=mode), "VALID"
    if pad == "CAUSAL":
      return x, [(dilated[0] - 1, 0)]
    return x, pad

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    n = len(self.kernel_size)
    x, batch, kernel, bias = _operands(self, inputs, n)
    x, pad = self._padding(x)
    y = self.conv_general_dilated(
        x, kernel, self.strides, pad,
        lhs_dilation=self.input_dilation, rhs_dilation=self.kernel_dilation,
        dimension_numbers=_dimension_numbers(n),
        feature_group_count=self.feature_group_count, precision=self.precision,
        **_common.call_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      y = _common.add_bias(y, bias)
    return y.reshape(batch + y.shape[1:])


class ConvTranspose(Module):
  """A transposed (fractionally strided) convolution, channels last.

  Args:
    in_features, out_features, kernel_size: as `Conv`.
    strides: int or tuple; the input is dilated by it (upsampling).
    padding: 'SAME', 'VALID', 'CIRCULAR' (periodic output of size
      ``input * strides``), or explicit (low, high) pairs.
    kernel_dilation: int or tuple.
    transpose_kernel: flip spatial axes and swap in/out (gradient-of-conv form;
      the kernel then has shape ``(*kernel_size, out_features, in_features)``).
    use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init,
    promote_dtype, preferred_element_type, kernel_metadata, bias_metadata,
    kernel_axes, bias_axes, rngs: as `Conv`.

  >>> from spmdnnx._rngs import Rngs
  >>> up = ConvTranspose(4, 2, kernel_size=(2, 2), strides=2, rngs=Rngs(0))
  >>> up(jnp.ones((1, 8, 8, 4))).shape
  (1, 16, 16, 2)
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] | None = None, *, padding: Any = "SAME",
               kernel_dilation: int | Sequence[int] | None = None, use_bias: bool = True,
               mask: jax.Array | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable = _DEFAULT_KERNEL_INIT,
               bias_init: Callable = initializers.zeros, transpose_kernel: bool = False,
               promote_dtype: Callable = _common.promote_dtypes,
               preferred_element_type: Any = None,
               kernel_axes: Sequence[str | None] | None = None,
               bias_axes: Sequence[str | None] | None = None, rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    name = "ConvTranspose"
    _common.check_positive(name, in_features=in_features, out_features=out_features)
    ks = _kernel_size(name, kernel_size)
    n = len(ks)
    padding = canonical_padding(name, padding, n)
    if padding in ("REFLECT", "CAUSAL"):
      raise errors.ConfigError(
          f"{name}: padding {padding!r} is not supported for transposed convs; "
          "use 'SAME', 'VALID' or explicit (low, high) pairs.",
          argument="padding", value=padding)
    shape = ks + ((out_features, in_features) if transpose_kernel
                  else (in_features, out_features))
    if mask is not None and tuple(mask.shape) != shape:
      raise errors.ConfigError(
          f"{name}: mask shape {tuple(mask.shape)} must equal the kernel shape {shape}.",
          shapes=[tuple(mask.shape), shape])
    _common.set_attrs(
        self, in_features=in_features, out_features=out_features, kernel_size=ks,
        strides=_common.canonical_tuple(name, "strides", 1 if strides is None else strides, n),
        padding=padding, kernel_dilation=_common.canonical_tuple(
            name, "kernel_dilation", 1 if kernel_dilation is None else kernel_dilation, n),
        transpose_kernel=transpose_kernel, use_bias=use_bias, mask=mask, dtype=dtype,
        param_dtype=param_dtype, precision=precision, bias=None, kernel_shape=shape,
        promote_dtype=promote_dtype, preferred_element_type=preferred_element_type)
    self.kernel = _common.make_param(name, "kernel", kernel_init, rngs.params(), shape,
                                     param_dtype, kernel_axes, metadata=kernel_metadata)
    if use_bias:
      axes = self.kernel.logical_axes
      default = None if axes is None else axes[-2 if transpose_kernel else -1:][:1]
      self.bias = _common.make_param(name, "bias", bias_init, rngs.params(),
                                     (out_features,), param_dtype, bias_axes, default,
                                     metadata=bias_metadata)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    n = len(self.kernel_size)
    x, batch, kernel, bias = _operands(self, inputs, n)
    spatial = "DHW"[3 - n:]
    circular = self.padding == "CIRCULAR"
    y = lax.conv_transpose(
        x, kernel, self.strides, "VALID" if circular else self.padding,
        rhs_dilation=self.kernel_dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        transpose_kernel=self.transpose_kernel, precision=self.precision,
        preferred_element_type=self.preferred_element_type)
    if circular:
      y = self._wrap_periodic(y, x.shape[1:-1])
    if bias is not None:
      y = _common.add_bias(y, jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)))
    return y.reshape(batch + y.shape[1:])

  def _wrap_periodic(self, y: jax.Array, in_spatial: tuple) -> jax.Array:
    """Folds a 'VALID' transposed-conv output onto periods of ``input * strides``.

    Each spatial axis is zero-padded to a whole number of periods (placing the
    input's start on a period boundary), cut into periods and summed.
    """
    periods = [size * s for size, s in zip(in_spatial, self.strides)]
    pads = []
    for got, period in zip(y.shape[1:-1], periods):
      extra = -(got - period) % (2 * period)
      # an odd extra goes to the right for a transposed kernel, else to the left
      left = extra // 2 if self.transpose_kernel else (extra + 1) // 2
      pads.append((left, extra - left))
    y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
    for axis, period in enumerate(periods, start=1):
      y = y.reshape(y.shape[:axis] + (-1, period) + y.shape[axis + 1:]).sum(axis=axis)
    return y
