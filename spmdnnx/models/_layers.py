"""Building blocks shared by the LMs: annotated parameters, SwiGLU MLP.

Logical names used by the models (parameters / activations):

* parameters: ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``kv`` (head
  width), ``vocab``, ``norm``; stacked blocks add ``layers``;
* activations: ``activation_batch``, ``activation_length``,
  ``activation_embed``, ``activation_mlp``, ``activation_heads``,
  ``activation_kv_heads``, ``activation_head_dim``, ``activation_vocab``.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.models._config import LMConfig
>>> mlp = SwiGLU(LMConfig(embed_dim=8, mlp_dim=16, head_dim=2), rngs=Rngs(0))
>>> mlp(jnp.ones((2, 3, 8))).shape, mlp.w_down.logical_axes
((2, 3, 8), ('mlp', 'embed'))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx._variables import Param
from spmdnnx.spmd._constrain import constrain
from spmdnnx.spmd._constrain import explicit_out_sharding

#: Logical names of a [batch, length, embed] activation.
BTE = ("activation_batch", "activation_length", "activation_embed")


def scaled_normal(rngs: Rngs, shape: Sequence[int], fan_in: int, axes: Sequence[str | None],
                  dtype: Any) -> Param:
  """A Param drawn from N(0, 1/fan_in), stored in ``dtype``, with logical axes."""
  value = jax.random.normal(rngs.params(), tuple(shape), jnp.float32) / math.sqrt(fan_in)
  return Param(value.astype(dtype), logical_axes=tuple(axes))


def project(subscripts: str, x: jax.Array, w: jax.Array, names: Sequence[str | None],
            **kwargs: Any) -> jax.Array:
  """``jnp.einsum(subscripts, x, w)`` whose output, on an Explicit mesh, is laid out by ``names``.

  On `AxisType.Explicit` meshes JAX needs the output sharding of a contraction
  over sharded dimensions; this passes the rules' layout of the output's
  logical ``names`` (`explicit_out_sharding`), and None (JAX decides) elsewhere.
  """
  inputs, out = subscripts.split("->")
  left, right = inputs.split(",")
  sizes = {**dict(zip(left, x.shape)), **dict(zip(right, w.shape))}
  shape = tuple(sizes[c] for c in out)
  return jnp.einsum(subscripts, x, w, out_sharding=explicit_out_sharding(names, shape),
                    **kwargs)


class SwiGLU(Module):
  """``w_down(silu(x @ w_gate) * (x @ w_up))``: the Llama MLP.

  Args:
    cfg: the `LMConfig` (``embed_dim``, ``mlp_dim``, dtypes).
    rngs: random streams.
  """

  def __init__(self, cfg: Any, *, rngs: Rngs):
    d, m, pdt = cfg.embed_dim, cfg.mlp_dim, cfg.jnp_param_dtype
    self.dtype = cfg.dtype
    self.w_gate = scaled_normal(rngs, (d, m), d, ("embed", "mlp"), pdt)
    self.w_up = scaled_normal(rngs, (d, m), d, ("embed", "mlp"), pdt)
    self.w_down = scaled_normal(rngs, (m, d), m, ("mlp", "embed"), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: ``[batch, length, embed]`` in the activation dtype."""
    dt = jnp.dtype(self.dtype)
    names = ("activation_batch", "activation_length", "activation_mlp")
    gate = project("btd,dm->btm", x, self.w_gate.value.astype(dt), names)
    up = project("btd,dm->btm", x, self.w_up.value.astype(dt), names)
    h = constrain(jax.nn.silu(constrain(gate, names)) * constrain(up, names), names)
    return project("btm,md->btd", h, self.w_down.value.astype(dt), BTE)
