"""Activation functions (from `jax.nn`) and the learnable `PReLU`.

>>> import jax.numpy as jnp
>>> relu(jnp.array([-1.0, 2.0]))
Array([0., 2.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.nn import celu as celu
from jax.nn import elu as elu
from jax.nn import gelu as gelu
from jax.nn import glu as glu
from jax.nn import hard_sigmoid as hard_sigmoid
from jax.nn import hard_silu as hard_silu
from jax.nn import hard_swish as hard_swish
from jax.nn import hard_tanh as hard_tanh
from jax.nn import identity as identity
from jax.nn import leaky_relu as leaky_relu
from jax.nn import log_sigmoid as log_sigmoid
from jax.nn import log_softmax as log_softmax
from jax.nn import logsumexp as logsumexp
from jax.nn import mish as mish
from jax.nn import one_hot as one_hot
from jax.nn import relu as relu
from jax.nn import relu6 as relu6
from jax.nn import selu as selu
from jax.nn import sigmoid as sigmoid
from jax.nn import silu as silu
from jax.nn import soft_sign as soft_sign
from jax.nn import softmax as softmax
from jax.nn import softplus as softplus
from jax.nn import standardize as standardize
from jax.nn import swish as swish
from jax.numpy import tanh as tanh

from spmdnnx._module import Module
from spmdnnx._variables import Param


class PReLU(Module):
  """Leaky ReLU whose negative slope is a learned scalar Param.

  Args:
    negative_slope_init: initial slope for negative inputs.
    param_dtype: dtype the slope is stored in.

  >>> PReLU()(jnp.array([-1.0, 2.0]))
  Array([-0.01,  2.  ], dtype=float32)
  """

  def __init__(self, negative_slope_init: float = 0.01,
               param_dtype: Any = jnp.float32):
    self.negative_slope = Param(jnp.asarray(negative_slope_init, dtype=param_dtype))

  def __call__(self, inputs):
    slope = self.negative_slope.value.astype(inputs.dtype)
    return jnp.where(inputs >= 0, inputs, slope * inputs)
