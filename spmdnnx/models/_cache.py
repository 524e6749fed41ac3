"""`KVCache`: keys and values of every layer for incremental decoding.

The cache holds, for all layers at once, ``k`` and ``v`` of shape
``[layers, batch, max_len, kv_heads, head_dim]`` as `nnx.Cache` Variables
annotated with logical axes (``layers``, ``activation_batch``,
``activation_length``, ``activation_kv_heads``, ``activation_head_dim``), so
under `use_sharding` it is laid out like the activations it stores, and the
number of positions already written, ``index``. Calling a model with
``cache=`` writes the new positions and advances ``index``.

>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.models._config import LMConfig
>>> cfg = LMConfig(embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
>>> cache = KVCache(cfg, batch_size=3, max_len=10)
>>> cache.k.shape, cache.k.logical_axes[:2], int(cache.index.value)
((2, 3, 10, 1, 8), ('layers', 'activation_batch'), 0)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx._variables import Cache
from spmdnnx.spmd._constrain import constrain

#: Logical axes of the cached keys and values.
KV_AXES = ("layers", "activation_batch", "activation_length", "activation_kv_heads",
           "activation_head_dim")


def check_cache_size(cfg: Any, batch_size: Any, max_len: Any) -> None:
  """Raises ShapeError unless the sizes are positive ints and fit ``cfg.max_seq_len``."""
  for name, v in (("batch_size", batch_size), ("max_len", max_len)):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise errors.ShapeError(f"KVCache: {name} must be a positive int, got {v!r}.")
  if max_len > cfg.max_seq_len:
    raise errors.ShapeError(
        f"KVCache: max_len={max_len} exceeds the model's max_seq_len="
        f"{cfg.max_seq_len}; shorten the prompt or max_new_tokens, or build the "
        "model with a larger max_seq_len.", shapes=[(batch_size, max_len)])


class KVCache(Module):
  """Per-layer keys/values (``k``, ``v``) and the write position ``index``.

  Args:
    cfg: the model's `LMConfig`. For ``kind="mlp"`` (no attention) ``k`` and
      ``v`` are None and only ``index`` is kept.
    batch_size: sequences decoded together.
    max_len: positions the cache holds (prompt + new tokens); at most
      ``cfg.max_seq_len``.

  Raises:
    ShapeError: for a non-positive size or ``max_len > cfg.max_seq_len``.
  """

  def __init__(self, cfg: Any, *, batch_size: int, max_len: int):
    check_cache_size(cfg, batch_size, max_len)
    self.max_len = max_len
    self.index = Cache(jnp.zeros((), jnp.int32))
    if cfg.kind == "mlp":
      self.k = self.v = None
      return
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = constrain(jnp.zeros(shape, cfg.jnp_dtype), KV_AXES)
    self.k = Cache(zeros, logical_axes=KV_AXES)
    self.v = Cache(constrain(jnp.zeros(shape, cfg.jnp_dtype), KV_AXES), logical_axes=KV_AXES)
