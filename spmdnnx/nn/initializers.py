"""Parameter initializers (the `jax.nn.initializers` set, under Flax's names).

Every initializer is a function ``init(key, shape, dtype) -> array``. Wrap one
with `spmdnnx.with_partitioning` to attach logical axes to the Param a layer
creates from it.

>>> import jax
>>> init = lecun_normal()
>>> init(jax.random.key(0), (3, 4)).shape
(3, 4)
>>> zeros_init()(jax.random.key(0), (2,))
Array([0., 0.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.nn.initializers import Initializer as Initializer
from jax.nn.initializers import constant as constant
from jax.nn.initializers import delta_orthogonal as delta_orthogonal
from jax.nn.initializers import glorot_normal as glorot_normal
from jax.nn.initializers import glorot_uniform as glorot_uniform
from jax.nn.initializers import he_normal as he_normal
from jax.nn.initializers import he_uniform as he_uniform
from jax.nn.initializers import kaiming_normal as kaiming_normal
from jax.nn.initializers import kaiming_uniform as kaiming_uniform
from jax.nn.initializers import lecun_normal as lecun_normal
from jax.nn.initializers import lecun_uniform as lecun_uniform
from jax.nn.initializers import normal as normal
from jax.nn.initializers import ones as ones
from jax.nn.initializers import orthogonal as orthogonal
from jax.nn.initializers import truncated_normal as truncated_normal
from jax.nn.initializers import uniform as uniform
from jax.nn.initializers import variance_scaling as variance_scaling
from jax.nn.initializers import xavier_normal as xavier_normal
from jax.nn.initializers import xavier_uniform as xavier_uniform
from jax.nn.initializers import zeros as zeros


def zeros_init() -> Initializer:
  """An initializer returning zeros (Flax's spelling of `zeros`)."""
  return zeros


def ones_init() -> Initializer:
  """An initializer returning ones (Flax's spelling of `ones`)."""
  return ones


def default_kernel_init() -> Initializer:
  """The kernel initializer dense and conv layers use: LeCun normal."""
  return lecun_normal()


def default_embed_init() -> Initializer:
  """Embedding tables: normal with variance 1 / features (vocab is the out axis)."""
  return variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def cast(init: Initializer, dtype: Any) -> Initializer:
  """An initializer that always produces `dtype` (whatever it is asked for)."""

  def cast_init(key, shape, _dtype=jnp.float32):
    return init(key, shape, dtype)

  return cast_init
