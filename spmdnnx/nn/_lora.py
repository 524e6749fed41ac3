"""Low-rank adapters: `LoRA` and `LoRALinear`.

`LoRA` computes ``x @ lora_a @ lora_b`` (rank ``lora_rank``), optionally plus
a wrapped base module's output. Its parameters are `LoRAParam`s, a `Param`
subclass, so a filter can pick them out: ``nnx.state(model, nnx.LoRAParam)``
is the adapter, and an optimizer built with ``wrt=nnx.LoRAParam`` trains the
adapter alone.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> layer = LoRALinear(4, 3, lora_rank=2, rngs=Rngs(0))
>>> layer.lora.lora_a.shape, layer.lora.lora_b.shape
((4, 2), (2, 3))
>>> bool(jnp.allclose(layer(jnp.ones((1, 4))), Linear.__call__(layer, jnp.ones((1, 4)))))
True
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx._variables import Param
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx.nn._linear import Linear

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class LoRAParam(Param):
  """The parameter type of low-rank adapters (a `Param`, filterable on its own).

  >>> import jax.numpy as jnp
  >>> isinstance(LoRAParam(jnp.zeros(2)), Param)
  True
  """


class LoRA(Module):
  """A low-rank update ``x @ lora_a @ lora_b`` (+ ``base_module(x)`` if given).

  Args:
    in_features: input width.
    lora_rank: the rank of the update.
    out_features: output width.
    base_module: an optional callable Module whose output is added.
    dtype: compute dtype (None: the common dtype).
    param_dtype: storage dtype of ``lora_a`` and ``lora_b``.
    a_initializer: initializer of ``lora_a`` (He uniform).
    b_initializer: initializer of ``lora_b`` (zeros: the update starts at 0).
    lora_param_type: the Variable type of the two matrices (`LoRAParam`).
    promote_dtype: ``f((x, a, b), dtype=...) -> tuple``, as the dense layers.
    rngs: random streams (``lora_a`` then ``lora_b`` each take a params key).
    a_metadata, b_metadata: extra Variable metadata (Flax's spelling).

  Raises:
    ConfigError: for non-positive sizes, or a base_module that is not callable.

  >>> from spmdnnx._rngs import Rngs
  >>> lora = LoRA(3, 2, 4, rngs=Rngs(0))
  >>> lora(jnp.ones((1, 3)))   # lora_b starts at zero
  Array([[0., 0., 0., 0.]], dtype=float32)
  """

  def __init__(self, in_features: int, lora_rank: int, out_features: int, *,
               base_module: Module | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               a_initializer: Callable = initializers.he_uniform(),
               b_initializer: Callable = initializers.zeros,
               lora_param_type: type = LoRAParam,
               promote_dtype: Callable = _common.promote_dtypes, rngs: Rngs,
               a_metadata: Mapping[str, Any] = _NO_METADATA,
               b_metadata: Mapping[str, Any] = _NO_METADATA):
    _common.check_positive("LoRA", in_features=in_features, lora_rank=lora_rank,
                           out_features=out_features)
    if base_module is not None and not callable(base_module):
      raise errors.ConfigError(
          f"LoRA: base_module must be callable (a Module with __call__), got "
          f"{type(base_module).__name__}.", value=type(base_module).__name__)
    _common.set_attrs(self, in_features=in_features, out_features=out_features,
                      lora_rank=lora_rank, dtype=dtype, param_dtype=param_dtype,
                      lora_param_type=lora_param_type, base_module=base_module,
                      promote_dtype=promote_dtype)
    self.lora_a = lora_param_type(
        a_initializer(rngs.params(), (in_features, lora_rank), param_dtype), **a_metadata)
    self.lora_b = lora_param_type(
        b_initializer(rngs.params(), (lora_rank, out_features), param_dtype), **b_metadata)

  def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
    _common.check_features(self, x, -1, self.in_features, "in features")
    x, a, b = self.promote_dtype((x, self.lora_a.value, self.lora_b.value), dtype=self.dtype)
    out = x @ a @ b
    if self.base_module is not None:
      base = self.base_module(x, **kwargs)
      with jax.numpy_dtype_promotion("standard"):
        out = out + base
    return out


class LoRALinear(Linear):
  """A `Linear` layer plus a `LoRA` adapter (``self.lora``) on the same input.

  Args:
    in_features, out_features: as `Linear`.
    lora_rank: the adapter's rank.
    lora_dtype, lora_param_dtype, lora_promote_dtype: the adapter's ``dtype``,
      ``param_dtype`` and ``promote_dtype``.
    a_initializer, b_initializer, lora_param_type, a_metadata, b_metadata: as
      `LoRA`.
    rngs: random streams (the Linear's kernel and bias first, then the adapter).
    **kwargs: the other `Linear` arguments.

  >>> from spmdnnx._rngs import Rngs
  >>> LoRALinear(3, 2, lora_rank=1, rngs=Rngs(0))(jnp.ones((5, 3))).shape
  (5, 2)
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int,
               lora_dtype: Any = None, lora_param_dtype: Any = jnp.float32,
               a_initializer: Callable = initializers.he_uniform(),
               b_initializer: Callable = initializers.zeros,
               lora_param_type: type = LoRAParam,
               lora_promote_dtype: Callable = _common.promote_dtypes, rngs: Rngs,
               a_metadata: Mapping[str, Any] = _NO_METADATA,
               b_metadata: Mapping[str, Any] = _NO_METADATA, **kwargs: Any):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self.lora = LoRA(in_features, lora_rank, out_features, dtype=lora_dtype,
                     param_dtype=lora_param_dtype, a_initializer=a_initializer,
                     b_initializer=b_initializer, lora_param_type=lora_param_type,
                     promote_dtype=lora_promote_dtype, rngs=rngs,
                     a_metadata=a_metadata, b_metadata=b_metadata)

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    y = super().__call__(x, out_sharding=out_sharding)
    with jax.numpy_dtype_promotion("standard"):
      return y + self.lora(x)
