"""`DecoderLM`: a Llama-style decoder-only language model.

Token embedding -> ``num_layers`` pre-norm blocks (RMSNorm, causal
grouped-query self-attention with rotary positions, RMSNorm, SwiGLU MLP, each
added to the residual stream) -> RMSNorm -> logits, with the output
projection tied to the embedding or separate. The blocks live in one
`nnx.Stack` (scanned over a ``layers`` axis, remat from the config) or in a
Python list (``scan_layers=False``). Attention runs through
`jax.nn.dot_product_attention`, which picks a fused kernel on GPU.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.models._config import LMConfig
>>> cfg = LMConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2,
...                num_kv_heads=1, head_dim=8, mlp_dim=32)
>>> model = DecoderLM(cfg, rngs=Rngs(0))
>>> logits = model(jnp.zeros((2, 5), jnp.int32))
>>> logits.shape, logits.dtype
((2, 5, 32), dtype('float32'))
>>> model.layers.block.attn.wq.logical_axes
('layers', 'embed', 'heads', 'kv')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx._object import List
from spmdnnx._pipeline import PipelineConfig
from spmdnnx._rngs import Rngs
from spmdnnx._stack import Stack
from spmdnnx._transforms import remat
from spmdnnx._transforms import resolve_policy
from spmdnnx.models._cache import KVCache
from spmdnnx.models._config import LMConfig
from spmdnnx.models._layers import BTE
from spmdnnx.models._layers import project
from spmdnnx.models._layers import scaled_normal
from spmdnnx.models._layers import SwiGLU
from spmdnnx.models._rope import apply_rope
from spmdnnx.nn._embed import Embed
from spmdnnx.nn._normalization import RMSNorm
from spmdnnx.nn import initializers
from spmdnnx.spmd._constrain import constrain

_Q_NAMES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_KV_NAMES = ("activation_batch", "activation_length", "activation_kv_heads",
             "activation_head_dim")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any) -> jax.Array:
  """`jax.nn.dot_product_attention` (fused on GPU); groups of query heads share a kv head.

  jax's implementation promotes bfloat16 scores against float32 internally,
  which strict dtype promotion rejects, so it runs under standard promotion.
  """
  with jax.numpy_dtype_promotion("standard"):
    return jax.nn.dot_product_attention(q, k, v, **kwargs)


class Attention(Module):
  """Causal grouped-query self-attention with rotary positions.

  Parameters: ``wq`` ``[embed, heads, kv]``, ``wk``/``wv``
  ``[embed, kv_heads, kv]``, ``wo`` ``[heads, kv, embed]`` (``kv`` is the
  head width).
  """

  def __init__(self, cfg: LMConfig, *, rngs: Rngs):
    d, n, k, h, pdt = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.jnp_param_dtype)
    self.dtype = cfg.dtype
    self.rope_theta = float(cfg.rope_theta)
    self.wq = scaled_normal(rngs, (d, n, h), d, ("embed", "heads", "kv"), pdt)
    self.wk = scaled_normal(rngs, (d, k, h), d, ("embed", "kv_heads", "kv"), pdt)
    self.wv = scaled_normal(rngs, (d, k, h), d, ("embed", "kv_heads", "kv"), pdt)
    self.wo = scaled_normal(rngs, (n, h, d), n * h, ("heads", "kv", "embed"), pdt)

  def __call__(self, x: jax.Array, positions: jax.Array, cache_k: jax.Array | None = None,
               cache_v: jax.Array | None = None, index: jax.Array | None = None) -> tuple:
    """Attends ``x`` (``[B, T, embed]``) causally.

    Without a cache, position ``t`` sees positions ``<= t`` of ``x``. With
    ``cache_k``/``cache_v`` (``[B, S, kv_heads, head_dim]``) the new keys and
    values are written at ``index .. index + T - 1`` and the queries see
    every cached position up to their own.

    Returns:
      ``(y, (cache_k, cache_v))``; the pair is None without a cache.
    """
    dt = jnp.dtype(self.dtype)
    q = project("btd,dnh->btnh", x, self.wq.value.astype(dt), _Q_NAMES)
    k = project("btd,dkh->btkh", x, self.wk.value.astype(dt), _KV_NAMES)
    v = project("btd,dkh->btkh", x, self.wv.value.astype(dt), _KV_NAMES)
    q = constrain(apply_rope(constrain(q, _Q_NAMES), positions, theta=self.rope_theta), _Q_NAMES)
    k = constrain(apply_rope(constrain(k, _KV_NAMES), positions, theta=self.rope_theta),
                  _KV_NAMES)
    v = constrain(v, _KV_NAMES)
    if cache_k is None:
      out = attend(q, k, v, is_causal=True)
      new_cache = None
    else:
      start = (0, index, 0, 0)
      cache_k = constrain(lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start),
                          _KV_NAMES)
      cache_v = constrain(lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start),
                          _KV_NAMES)
      q_pos = index + jnp.arange(x.shape[1], dtype=jnp.int32)
      k_pos = jnp.arange(cache_k.shape[1], dtype=jnp.int32)
      mask = (k_pos[None, :] <= q_pos[:, None])[None, None]      # [1, 1, T, S]
      out = attend(q, cache_k.astype(dt), cache_v.astype(dt), mask=mask)
      new_cache = (cache_k, cache_v)
    out = constrain(out, _Q_NAMES)
    return project("btnh,nhd->btd", out, self.wo.value.astype(dt), BTE), new_cache


class Block(Module):
  """One pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: LMConfig, *, rngs: Rngs):
    norm = dict(epsilon=cfg.norm_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                rngs=rngs)
    self.attn_norm = RMSNorm(cfg.embed_dim, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, **norm)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, cache_k: jax.Array | None = None,
               cache_v: jax.Array | None = None, *, positions: jax.Array,
               index: jax.Array | None = None) -> Any:
    """Returns the new residual stream, and ``(cache_k, cache_v)`` when given a cache."""
    h, new_cache = self.attn(self.attn_norm(x), positions, cache_k, cache_v, index)
    x = constrain(x + h, BTE)
    x = constrain(x + self.mlp(self.mlp_norm(x)), BTE)
    return x if new_cache is None else (x, new_cache)


def check_tokens(cfg: LMConfig, tokens: Any, positions: Any, cache: Any) -> None:
  """Raises ShapeError for ids/positions an LM cannot take."""
  shape = tuple(jnp.shape(tokens))
  if len(shape) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise errors.ShapeError(
        f"LM: tokens must be integer ids of shape [batch, length], got "
        f"{jnp.result_type(tokens)}{list(shape)}; cast with .astype(jnp.int32) and add a "
        "batch axis if needed.", shapes=[shape])
  limit = cfg.max_seq_len if cache is None else cache.max_len
  if shape[1] > limit:
    what = "max_seq_len" if cache is None else "the cache's max_len"
    raise errors.ShapeError(
        f"LM: {shape[1]} tokens exceed {what}={limit}; split the sequence or raise "
        f"{what}.", shapes=[shape])
  if cache is not None and cache.k is not None and cache.k.shape[1] != shape[0]:
    raise errors.ShapeError(
        f"LM: the cache holds a batch of {cache.k.shape[1]} sequences but the tokens have "
        f"batch {shape[0]}; make the cache with init_cache(model, {shape[0]}, max_len).",
        shapes=[shape, tuple(cache.k.shape)])
  if cache is not None and not isinstance(cache.index.value, jax.core.Tracer) \
      and int(cache.index.value) + shape[1] > cache.max_len:
    raise errors.ShapeError(
        f"LM: the cache is full: {int(cache.index.value)} positions written + "
        f"{shape[1]} new > max_len={cache.max_len}; make a longer cache with init_cache.",
        shapes=[shape])
  if positions is not None and tuple(jnp.shape(positions)) != shape:
    raise errors.ShapeError(
        f"LM: positions must have the tokens' shape {list(shape)}, got "
        f"{list(jnp.shape(positions))}.", shapes=[shape, tuple(jnp.shape(positions))])


def make_blocks(cfg: LMConfig, make_block: Any, rngs: Rngs,
                batch_kwargs: tuple[str, ...] = ()) -> Any:
  """The model's blocks: an `nnx.Stack` (``scan_layers``) or a tracked list.

  With ``cfg.pipeline_microbatches > 0`` the Stack gets a `PipelineConfig`
  (``batch_kwargs``: the per-example keyword arguments of a block call).
  """
  if cfg.scan_layers:
    pipeline = None
    if cfg.pipeline_microbatches > 0:
      pipeline = PipelineConfig(cfg.pipeline_microbatches, cfg.pipeline_repeats,
                                batch_kwargs=batch_kwargs)
    return Stack(make_block, cfg.num_layers, rngs=rngs, remat=cfg.remat, pipeline=pipeline)
  return List([make_block(rngs) for _ in range(cfg.num_layers)])


def apply_list(cfg: LMConfig, blocks: Any, x: jax.Array, **kwargs: Any) -> jax.Array:
  """Applies a list of blocks in order, each under the config's remat policy."""
  policy = None if cfg.remat == "none" else resolve_policy(cfg.remat)
  for block in blocks:
    if policy is None:
      x = block(x, **kwargs)
    else:
      x = remat(lambda b, h, kw: b(h, **kw), policy=policy)(block, x, kwargs)
  return x


def output_logits(x: jax.Array, table: jax.Array, dt: Any, tied: bool) -> jax.Array:
  """Float32 logits ``[B, T, vocab]`` from the final hidden states."""
  spec = "btd,vd->btv" if tied else "btd,dv->btv"
  names = ("activation_batch", "activation_length", "activation_vocab")
  logits = project(spec, x, table.astype(dt), names, preferred_element_type=jnp.float32)
  return constrain(logits, names)


class TokenLM(Module):
  """What both LMs share: the embedding, the final norm and the output projection."""

  def _init_io(self, cfg: LMConfig, rngs: Rngs) -> None:
    self.config = cfg
    d, pdt = cfg.embed_dim, cfg.jnp_param_dtype
    self.embed = Embed(cfg.vocab_size, d, dtype=cfg.jnp_dtype, param_dtype=pdt,
                       embedding_init=initializers.normal(d ** -0.5),
                       embedding_axes=("vocab", "embed"), rngs=rngs)

  def _init_head(self, cfg: LMConfig, rngs: Rngs) -> None:
    d, pdt = cfg.embed_dim, cfg.jnp_param_dtype
    self.final_norm = RMSNorm(d, epsilon=cfg.norm_eps, dtype=cfg.jnp_dtype, param_dtype=pdt,
                              rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = scaled_normal(rngs, (d, cfg.vocab_size), d, ("embed", "vocab"), pdt)

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm, then the tied or untied output projection (float32 logits)."""
    cfg = self.config
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      return output_logits(x, self.embed.embedding.value, cfg.jnp_dtype, True)
    return output_logits(x, self.lm_head.value, cfg.jnp_dtype, False)


class DecoderLM(TokenLM):
  """A Llama-style decoder LM built from an `LMConfig` (``kind="llama"``).

  Args:
    cfg: the hyper-parameters.
    rngs: random streams (``params``).

  Attributes:
    embed: `nn.Embed` ``[vocab, embed]``; also the output projection when
      ``cfg.tie_embeddings``.
    layers: `nnx.Stack` of `Block` (or a list of them).
    final_norm: RMSNorm before the output projection.
    lm_head: Param ``[embed, vocab]`` (absent when tied).

  Raises:
    ConfigError: if ``cfg`` is not an `LMConfig` of kind ``"llama"``.
  """

  def __init__(self, cfg: LMConfig, *, rngs: Rngs):
    if not isinstance(cfg, LMConfig) or cfg.kind != "llama":
      raise errors.ConfigError(
          f"DecoderLM needs an LMConfig with kind='llama', got {cfg!r}; use build_model "
          "to pick the model from the kind.")
    self._init_io(cfg, rngs)
    self.layers = make_blocks(cfg, lambda r: Block(cfg, rngs=r), rngs,
                              batch_kwargs=("positions",))
    self._init_head(cfg, rngs)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               cache: KVCache | None = None) -> jax.Array:
    """Next-token logits for every position.

    Args:
      tokens: ``int[B, T]`` token ids.
      positions: ``int[B, T]`` positions for the rotary embeddings (default
        ``0..T-1``, or continuing from the cache's ``index``). They do not
        change the causal mask: position ``t`` always sees tokens ``<= t``.
      cache: a `KVCache` (see `init_cache`): the tokens continue the cached
        sequence; their keys/values are written and ``cache.index`` advances.

    Returns:
      ``float32[B, T, vocab_size]`` logits.

    Raises:
      ShapeError: tokens that are not ``int[B, T]``, longer than
        ``max_seq_len`` (or the cache), or positions of another shape.
    """
    cfg = self.config
    check_tokens(cfg, tokens, positions, cache)
    batch, length = tokens.shape
    index = None if cache is None else cache.index.value
    if positions is None:
      start = 0 if index is None else index
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32),
                                   (batch, length))
    x = constrain(self.embed(tokens), BTE)
    kwargs = dict(positions=positions)
    if cache is None:
      if cfg.scan_layers:
        x = self.layers(x, **kwargs)
      else:
        x = apply_list(cfg, self.layers, x, **kwargs)
    else:
      x = self._decode_layers(x, cache, positions, index)
    logits = self._logits(x)
    if cache is not None:
      # Writing past the cache's end would clamp and overwrite the last
      # positions; inside a trace that cannot raise, so the logits become NaN.
      logits = jnp.where(index + length > cache.max_len, jnp.float32(jnp.nan), logits)
    return logits

  def _decode_layers(self, x: jax.Array, cache: KVCache, positions: jax.Array,
                     index: jax.Array) -> jax.Array:
    kw = dict(positions=positions, index=index)
    if self.config.scan_layers:
      x, (k, v) = self.layers(x, cache.k.value, cache.v.value, **kw)
    else:
      ks, vs = [], []
      for i, block in enumerate(self.layers):
        x, (k, v) = block(x, cache.k.value[i], cache.v.value[i], **kw)
        ks.append(k)
        vs.append(v)
      k, v = jnp.stack(ks), jnp.stack(vs)
    cache.k.value = k
    cache.v.value = v
    cache.index.value = index + x.shape[1]
    return x
