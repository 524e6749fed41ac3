"""`MlpLM`: a position-wise LM (embedding -> residual SwiGLU blocks -> logits).

Each position predicts the next token from its own token only (a learned
bigram model), so it has no attention and no positions; it exists for fast
smoke runs of the runtime (the ``mlp_quick`` preset) and takes the same
call arguments as `DecoderLM`.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.models._config import LMConfig
>>> model = MlpLM(LMConfig(kind="mlp", vocab_size=16, embed_dim=8, mlp_dim=16,
...                        num_layers=2, head_dim=2), rngs=Rngs(0))
>>> model(jnp.zeros((2, 3), jnp.int32)).shape
(2, 3, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx.models._cache import KVCache
from spmdnnx.models._config import LMConfig
from spmdnnx.models._layers import BTE
from spmdnnx.models._layers import SwiGLU
from spmdnnx.models._llama import apply_list
from spmdnnx.models._llama import check_tokens
from spmdnnx.models._llama import make_blocks
from spmdnnx.models._llama import TokenLM
from spmdnnx.nn._normalization import RMSNorm
from spmdnnx.spmd._constrain import constrain


class MlpBlock(Module):
  """``x + mlp(norm(x))``, applied to every position independently."""

  def __init__(self, cfg: LMConfig, *, rngs: Rngs):
    self.norm = RMSNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=cfg.jnp_dtype,
                        param_dtype=cfg.jnp_param_dtype, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(x + self.mlp(self.norm(x)), BTE)


class MlpLM(TokenLM):
  """A position-wise LM built from an `LMConfig` (``kind="mlp"``).

  Uses ``vocab_size``, ``embed_dim``, ``mlp_dim``, ``num_layers``,
  ``tie_embeddings``, ``norm_eps``, ``remat``, the dtypes and
  ``scan_layers``; the attention fields are ignored.

  Raises:
    ConfigError: if ``cfg`` is not an `LMConfig` of kind ``"mlp"``.
  """

  def __init__(self, cfg: LMConfig, *, rngs: Rngs):
    if not isinstance(cfg, LMConfig) or cfg.kind != "mlp":
      raise errors.ConfigError(
          f"MlpLM needs an LMConfig with kind='mlp', got {cfg!r}; use build_model to "
          "pick the model from the kind.")
    self._init_io(cfg, rngs)
    self.layers = make_blocks(cfg, lambda r: MlpBlock(cfg, rngs=r), rngs)
    self._init_head(cfg, rngs)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               cache: KVCache | None = None) -> jax.Array:
    """``float32[B, T, vocab]`` logits; ``positions`` are checked, then unused.

    With a ``cache`` only its ``index`` advances (nothing else is needed).
    """
    cfg = self.config
    check_tokens(cfg, tokens, positions, cache)
    x = constrain(self.embed(tokens), BTE)
    x = self.layers(x) if cfg.scan_layers else apply_list(cfg, self.layers, x)
    if cache is not None:
      cache.index.value = cache.index.value + jnp.int32(tokens.shape[1])
    return self._logits(x)
