"""Parameter counts and training FLOPs per token, from an `LMConfig` alone.

With ``d = embed_dim``, ``L = num_layers``, ``n = num_heads``,
``k = num_kv_heads``, ``h = head_dim``, ``m = mlp_dim``, ``V = vocab_size``:

* one llama block: ``d*h*(2n + 2k)`` (q, k, v, o) ``+ 3*d*m`` (SwiGLU)
  ``+ 2*d`` (two RMSNorm scales); one mlp block: ``3*d*m + d``;
* the model: ``V*d`` (embedding) ``+ L * block + d`` (final norm)
  ``+ d*V`` when the output projection is not tied.

``param_count(cfg, non_embedding=True)`` leaves out the ``V*d`` input
embedding (an untied output projection stays in).

Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per
multiply-add)::

  6 * (L * (d*h*(2n + 2k) + 3*d*m) + d*V)  +  12 * L * seq_len * n * h

The first term counts every matmul weight once, the output projection
included whether or not it is tied (the lookup of the input embedding and
the norms are not matmuls and are left out). The second is attention's
``Q K^T`` and ``A V`` products (``4 * seq_len * n * h`` per token and layer
forward), counted over the full ``seq_len x seq_len`` score matrix as in
PaLM's MFU accounting (causality is not halved). Remat recomputation is not
counted (model FLOPs, not hardware FLOPs). An mlp model has no attention term.

>>> from spmdnnx.models._config import LMConfig
>>> cfg = LMConfig(vocab_size=10, embed_dim=4, num_layers=1, num_heads=2,
...                num_kv_heads=1, head_dim=2, mlp_dim=8)
>>> param_count(cfg)      # 40 + (4*2*6 + 96 + 8) + 4
196
>>> flops_per_token(cfg, seq_len=3)   # 6 * (48 + 96 + 40) + 12 * 3 * 2 * 2
1248.0
"""

from __future__ import annotations

from spmdnnx import errors
from spmdnnx.models._config import LMConfig


def _check(cfg: LMConfig) -> None:
  if not isinstance(cfg, LMConfig):
    raise errors.ConfigError(f"expected an LMConfig, got {type(cfg).__name__}.")


def _attention_weights(cfg: LMConfig) -> int:
  if cfg.kind == "mlp":
    return 0
  return cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)


def _block_norms(cfg: LMConfig) -> int:
  return cfg.embed_dim * (1 if cfg.kind == "mlp" else 2)


def param_count(cfg: LMConfig, *, non_embedding: bool = False) -> int:
  """Number of parameters of ``build_model(cfg)`` (see the module doc).

  Args:
    cfg: the model config.
    non_embedding: leave out the input embedding table (``V * d``).

  Raises:
    ConfigError: if ``cfg`` is not an `LMConfig`.
  """
  _check(cfg)
  d, v = cfg.embed_dim, cfg.vocab_size
  block = _attention_weights(cfg) + 3 * d * cfg.mlp_dim + _block_norms(cfg)
  total = cfg.num_layers * block + d + (0 if cfg.tie_embeddings else d * v)
  return int(total if non_embedding else total + v * d)


def flops_per_token(cfg: LMConfig, seq_len: int) -> float:
  """Training FLOPs per token at sequence length ``seq_len`` (see the module doc).

  Raises:
    ConfigError: if ``cfg`` is not an `LMConfig` or ``seq_len`` is not a
      positive int.
  """
  _check(cfg)
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
    raise errors.ConfigError(f"flops_per_token: seq_len must be a positive int, got "
                             f"{seq_len!r}.")
  d, layers = cfg.embed_dim, cfg.num_layers
  matmul = layers * (_attention_weights(cfg) + 3 * d * cfg.mlp_dim) + d * cfg.vocab_size
  attention = 0 if cfg.kind == "mlp" else \
      12 * layers * seq_len * cfg.num_heads * cfg.head_dim
  return float(6 * matmul + attention)
