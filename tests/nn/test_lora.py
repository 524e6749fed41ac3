"""LoRA and LoRALinear: maths, parameter type, arguments and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import LoRA, LoRALinear, LoRAParam, Linear, initializers


def test_lora_adds_the_low_rank_update_to_the_base_module():
  base = Linear(3, 4, rngs=nnx.Rngs(0))
  lora = LoRA(3, 2, 4, base_module=base, b_initializer=initializers.normal(1.0),
              rngs=nnx.Rngs(1))
  assert isinstance(lora.lora_a, LoRAParam) and lora.lora_a.shape == (3, 2)
  x = jax.random.normal(jax.random.key(2), (5, 3))
  a, b = np.asarray(lora.lora_a.value), np.asarray(lora.lora_b.value)
  close(lora(x), np.asarray(x) @ a @ b + np.asarray(base(x)), 1e-5)


def test_lora_linear_trains_only_the_adapter_by_filter():
  layer = LoRALinear(3, 2, lora_rank=1, rngs=nnx.Rngs(0),
                     a_metadata={"out_sharding": ("embed", None)})
  assert layer.lora.lora_a.logical_axes == ("embed", None)
  x = jax.random.normal(jax.random.key(1), (4, 3))
  # lora_b starts at zero: the layer starts as its Linear part
  close(layer(x), Linear.__call__(layer, x))
  adapter = nnx.state(layer, LoRAParam)
  assert sorted(p for p, _ in adapter.flat_state()) == [("lora", "lora_a"), ("lora", "lora_b")]
  graphdef, lora_params, rest = nnx.split(layer, LoRAParam, ...)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)

  grads = jax.grad(loss)(lora_params)
  assert float(jnp.abs(grads["lora"]["lora_b"].value).sum()) > 0


def test_lora_dtypes_and_errors():
  lora = LoRA(3, 2, 4, param_dtype=jnp.bfloat16, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert lora.lora_a.dtype == jnp.bfloat16
  assert lora(jnp.ones((1, 3))).dtype == jnp.float32
  with pytest.raises(errors.ConfigError, match="LoRA: base_module must be callable"):
    LoRA(3, 2, 4, base_module=jnp.ones(2), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match="LoRA: lora_rank must be a positive int"):
    LoRA(3, 0, 4, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match="LoRA: expected an input whose axis -1 has 3"):
    lora(jnp.ones((1, 5)))
