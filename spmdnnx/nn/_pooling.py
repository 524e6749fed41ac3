"""Pooling over spatial windows: `pool`, `max_pool`, `avg_pool`, `min_pool`.

Inputs are channels-last, ``(*batch, *spatial, features)``, or unbatched
``(*spatial, features)``; ``len(window_shape)`` is the number of spatial dims.

>>> import jax.numpy as jnp
>>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
>>> max_pool(x, (2, 2), strides=(2, 2))[0, ..., 0]
Array([[ 5.,  7.],
       [13., 15.]], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spmdnnx import errors
from spmdnnx.nn import _common


def _padding(padding: Any, n: int) -> Any:
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise errors.ConfigError(
          f"pool: padding {padding!r} must be 'SAME', 'VALID' or {n} (low, high) pairs.",
          argument="padding", value=padding)
    return padding.upper()
  try:
    pairs = tuple(tuple(p) for p in padding)
  except TypeError:
    pairs = ()
  if len(pairs) != n or not all(len(p) == 2 for p in pairs):
    raise errors.ConfigError(
        f"pool: explicit padding {padding!r} must have one (low, high) pair per "
        f"spatial dimension ({n}).", argument="padding", value=padding)
  return ((0, 0),) + pairs + ((0, 0),)


def pool(inputs: jax.Array, init: Any, reduce_fn: Callable,
         window_shape: Sequence[int], strides: Sequence[int] | None = None,
         padding: Any = "VALID") -> jax.Array:
  """Reduces each window with ``lax.reduce_window(init, reduce_fn)``.

  Raises:
    ConfigError: for bad window, strides or padding.
    ShapeError: when the input has too few dimensions for the window.
  """
  window = _common.canonical_tuple("pool", "window_shape", tuple(window_shape),
                                   len(tuple(window_shape)))
  n = len(window)
  strides = _common.canonical_tuple("pool", "strides", strides or (1,) * n, n)
  pad = _padding(padding, n)
  if inputs.ndim < n + 1:
    raise errors.ShapeError(
        f"pool: a {n}-d window needs an input of shape (*batch, {n} spatial dims, "
        f"features), got shape {tuple(inputs.shape)}.", shapes=[tuple(inputs.shape)])
  unbatched = inputs.ndim == n + 1
  x = inputs[None] if unbatched else inputs
  batch = x.shape[:x.ndim - n - 1]
  x = x.reshape((math.prod(batch),) + x.shape[len(batch):])
  if jnp.issubdtype(x.dtype, jnp.integer) and init in (jnp.inf, -jnp.inf):
    info = jnp.iinfo(x.dtype)
    init = info.max if init > 0 else info.min
  y = lax.reduce_window(x, np.array(init, x.dtype), reduce_fn, (1,) + window + (1,),
                        (1,) + strides + (1,), pad)
  y = y.reshape(batch + y.shape[1:])
  return y[0] if unbatched else y


def max_pool(inputs: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None, padding: Any = "VALID") -> jax.Array:
  """The maximum of each window."""
  return pool(inputs, -jnp.inf, lax.max, window_shape, strides, padding)


def min_pool(inputs: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None, padding: Any = "VALID") -> jax.Array:
  """The minimum of each window."""
  return pool(inputs, jnp.inf, lax.min, window_shape, strides, padding)


def avg_pool(inputs: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None, padding: Any = "VALID",
             count_include_pad: bool = True) -> jax.Array:
  """The mean of each window; padded entries count unless count_include_pad=False."""
  total = pool(inputs, 0.0, lax.add, window_shape, strides, padding)
  if count_include_pad:
    return total / jnp.asarray(math.prod(window_shape), total.dtype)
  ones = jnp.ones(inputs.shape[-len(tuple(window_shape)) - 1:-1] + (1,), inputs.dtype)
  counts = pool(ones, 0.0, lax.add, window_shape, strides, padding)
  return total / counts
