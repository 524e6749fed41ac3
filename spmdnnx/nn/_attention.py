"""Attention: `MultiHeadAttention`, `dot_product_attention` and mask helpers.

Masks are boolean (or 0/1) arrays broadcastable to
``(*batch, num_heads, q_length, kv_length)``; True means "may attend".
Projections are `LinearGeneral` layers whose kernels are annotated by default:
q/k/v ``("embed", "heads", "kv")``, output ``("heads", "kv", "embed")``.

With ``decode=True`` the layer attends one new token per call to keys and
values cached in `Cache` Variables made by `MultiHeadAttention.init_cache`.

Under `use_sharding` the projections constrain their outputs by activation
names (see `spmdnnx.nn.Linear`): q/k/v and the attention result to
``("activation_batch", "activation_length", "activation_heads",
"activation_head_dim")``, the output to ``(..., "activation_embed")``.
``activation_axes=None`` switches this off.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> mha = MultiHeadAttention(num_heads=2, in_features=8, rngs=Rngs(0))
>>> x = jnp.ones((1, 5, 8))
>>> mha(x, mask=make_causal_mask(jnp.ones((1, 5)))).shape
(1, 5, 8)
>>> mha.query.kernel.logical_axes
('embed', 'heads', 'kv')
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx.nn._dropout import draw_key, own_stream
from spmdnnx.nn._linear import LinearGeneral
from spmdnnx.nn._normalization import LayerNorm
from spmdnnx._rngs import Rngs
from spmdnnx.spmd._constrain import layout_activation
from spmdnnx._variables import Cache, Intermediate

QKV_KERNEL_AXES = ("embed", "heads", "kv")
OUT_KERNEL_AXES = ("heads", "kv", "embed")
CACHE_AXES = ("batch", "length", "heads", "kv")
#: Key/value kernels and caches of grouped-query attention (fewer kv heads).
GQA_KV_KERNEL_AXES = ("embed", "kv_heads", "kv")
GQA_CACHE_AXES = ("batch", "length", "kv_heads", "kv")
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _check_qkv(owner: str, query, key, value=None) -> None:
  """Raises ShapeError naming what differs between query, key (and value)."""
  arrays = (query, key) if value is None else (query, key, value)
  shapes = [tuple(a.shape) for a in arrays]
  names = "query, key" + ("" if value is None else ", value")
  problem = None
  if len({a.ndim for a in arrays}) != 1:
    problem = f"{names} must have the same rank"
  elif len({s[:-3] for s in shapes}) != 1:
    problem = f"{names} batch dims must match"
  elif value is not None and key.shape[-3] != value.shape[-3]:
    problem = "key and value lengths must match"
  elif query.shape[-1] != key.shape[-1]:
    problem = "query and key depths must match"
  elif value is not None and key.shape[-2] != value.shape[-2]:
    problem = "key and value heads must match"
  elif query.shape[-2] % key.shape[-2]:
    problem = (f"the query heads ({query.shape[-2]}) must be a multiple of the key heads "
               f"({key.shape[-2]}) for grouped-query attention")
  if problem:
    raise errors.ShapeError(
        f"{owner}: {problem}; expected query (*batch, q_len, heads, d) and key/value "
        f"(*batch, kv_len, kv_heads, d); got shapes {shapes}.", shapes=shapes)


def _causal_logits_mask(logits: jax.Array) -> jax.Array:
  """Lower-triangular (q >= k) mask over the last two axes of ``logits``."""
  q_len, kv_len = logits.shape[-2:]
  return jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))


def dot_product_attention_weights(query, key, bias=None, mask=None,
                                  broadcast_dropout: bool = True, dropout_rng=None,
                                  dropout_rate: float = 0.0, deterministic: bool = False,
                                  dtype: Any = None, precision: Any = None,
                                  module: Module | None = None,
                                  promote_dtype: Callable = _common.promote_dtypes,
                                  is_causal: bool = False):
  """Softmax attention weights ``(*batch, heads, q_len, kv_len)``.

  Args:
    query: ``(*batch, q_len, heads, head_dim)``.
    key: ``(*batch, kv_len, kv_heads, head_dim)``; ``kv_heads`` may divide
      ``heads`` (grouped-query attention: each key head serves
      ``heads // kv_heads`` consecutive query heads).
    bias, mask: added to / masking the logits (mask True = keep).
    broadcast_dropout: share the dropout mask over batch and heads.
    dropout_rng, dropout_rate, deterministic: attention dropout.
    dtype: compute dtype (None: common dtype of query and key).
    precision: einsum precision.
    module: if given, the weights are sown there as ``attention_weights``.
    promote_dtype: ``f((query, key), dtype=...) -> tuple`` (Flax's signature).
    is_causal: also mask keys after each query position (``q >= k``).

  Raises:
    ShapeError: when the heads of the query are not a multiple of the key's.
  """
  query, key = promote_dtype((query, key), dtype=dtype)
  _check_qkv("dot_product_attention_weights", query, key)
  heads, kv_heads = query.shape[-2], key.shape[-2]
  depth = query.shape[-1]
  query = query / jnp.sqrt(jnp.asarray(depth, query.dtype))
  if kv_heads == heads:
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)
  else:
    grouped = query.reshape(query.shape[:-2] + (kv_heads, heads // kv_heads, depth))
    logits = jnp.einsum("...qhgd,...khd->...hgqk", grouped, key, precision=precision)
    logits = logits.reshape(logits.shape[:-4] + (heads,) + logits.shape[-2:])
  if logits.dtype != jnp.float64:
    logits = logits.astype(jnp.float32)  # softmax in f32 even for bf16 inputs
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  if is_causal:
    causal = _causal_logits_mask(logits)
    mask = causal if mask is None else jnp.logical_and(jnp.asarray(mask, bool), causal)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
  if module is not None:
    module.sow(Intermediate, "attention_weights", weights)
  if not deterministic and dropout_rate > 0.0:
    if dropout_rng is None:
      raise errors.ConfigError(
          "dot_product_attention: dropout_rate > 0 and not deterministic, but no "
          "dropout_rng was given; pass one or set deterministic=True.")
    keep = 1.0 - dropout_rate
    shape = ((1,) * (key.ndim - 2) + weights.shape[-2:] if broadcast_dropout
             else weights.shape)
    kept = jax.random.bernoulli(dropout_rng, keep, shape)
    weights = jnp.where(kept, weights / jnp.asarray(keep, weights.dtype),
                        jnp.zeros((), weights.dtype))
  return weights


def dot_product_attention(query, key, value, bias=None, mask=None,
                          broadcast_dropout: bool = True, dropout_rng=None,
                          dropout_rate: float = 0.0, deterministic: bool = False,
                          dtype: Any = None, precision: Any = None,
                          module: Module | None = None,
                          promote_dtype: Callable = _common.promote_dtypes,
                          is_causal: bool = False):
  """Scaled dot-product attention ``softmax(q k^T / sqrt(d)) v`` per head.

  Shapes: query ``(*batch, q_len, heads, d)``, key/value
  ``(*batch, kv_len, kv_heads, d)`` with ``kv_heads`` dividing ``heads``
  (grouped-query attention); returns ``(*batch, q_len, heads, d)``. Other
  arguments: see `dot_product_attention_weights`.

  Raises:
    ShapeError: when query, key and value disagree on batch, heads or depth.

  >>> q, kv = jnp.ones((1, 3, 4, 2)), jnp.ones((1, 5, 2, 2))
  >>> dot_product_attention(q, kv, kv, is_causal=True).shape
  (1, 3, 4, 2)
  """
  _check_qkv("dot_product_attention", query, key, value)
  weights = dot_product_attention_weights(
      query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
      deterministic, dtype, precision, module, promote_dtype, is_causal)
  (value,) = promote_dtype((value,), dtype=weights.dtype)
  heads, kv_heads = query.shape[-2], value.shape[-2]
  if heads == kv_heads:
    return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)
  grouped = weights.reshape(weights.shape[:-3] + (kv_heads, heads // kv_heads)
                            + weights.shape[-2:])
  out = jnp.einsum("...hgqk,...khd->...qhgd", grouped, value, precision=precision)
  return out.reshape(out.shape[:-3] + (heads, out.shape[-1]))


def make_attention_mask(query_input, key_input, pairwise_fn: Callable = jnp.multiply,
                        extra_batch_dims: int = 0, dtype: Any = jnp.float32):
  """A ``(*batch, 1, q_len, kv_len)`` mask from per-position query/key values.

  >>> make_attention_mask(jnp.array([[1, 1, 0]]), jnp.array([[1, 0]])).shape
  (1, 1, 3, 2)
  """
  mask = pairwise_fn(jnp.expand_dims(query_input, -1), jnp.expand_dims(key_input, -2))
  mask = jnp.expand_dims(mask, -3)
  mask = jnp.expand_dims(mask, tuple(range(extra_batch_dims)))
  return mask.astype(dtype)


def make_causal_mask(x, extra_batch_dims: int = 0, dtype: Any = jnp.float32):
  """A causal mask ``(*batch, 1, len, len)`` for a ``(*batch, len)`` array."""
  idx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idx, idx, jnp.greater_equal, extra_batch_dims, dtype)


def combine_masks(*masks, dtype: Any = jnp.float32):
  """Logical AND of masks (None entries skipped); None if all are None.

  Raises:
    ShapeError: when the masks have different ranks.
  """
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  if len({m.ndim for m in masks}) != 1:
    raise errors.ShapeError(
        f"combine_masks: masks must have the same rank, got shapes "
        f"{[tuple(m.shape) for m in masks]}.")
  out = functools.reduce(jnp.logical_and, [m.astype(bool) for m in masks])
  return out.astype(dtype)


def _has_axes(init: Callable) -> bool:
  return _common.initializer_metadata(init).get("logical_axes") is not None


def _has_axes_meta(metadata: Mapping[str, Any]) -> bool:
  """Whether a ``*_metadata`` mapping names the axes (then no default axes apply)."""
  return any(metadata.get(k) is not None for k in _common.AXES_KEYS)


def _first(*values):
  return next((v for v in values if v is not None), None)


class MultiHeadAttention(Module):
  """Multi-head dot-product attention (self or cross), with optional KV cache.

  Args:
    num_heads: number of query heads.
    in_features: width of the query input.
    qkv_features: total width of q (and of k/v per kv head group) across heads
      (default in_features); must be divisible by num_heads.
    out_features: output width (default in_features).
    num_kv_heads: number of key/value heads (default num_heads); fewer gives
      grouped-query attention (it must divide num_heads).
    in_kv_features: width of the key/value inputs (default in_features).
    dtype, param_dtype, precision: as `Linear`.
    broadcast_dropout, dropout_rate: attention-weight dropout.
    deterministic: default mode (None: must be given when dropout_rate > 0).
    kernel_init, bias_init: q/k/v initializers; out_kernel_init and
      out_bias_init default to them.
    use_bias: biases on all projections.
    attention_fn: ``fn(q, k, v, mask=..., ..., is_causal=...)`` (default
      `dot_product_attention`).
    decode: default for decoding with the KV cache.
    normalize_qk: LayerNorm (scale only) on queries and keys per head.
    qkv_promote_dtype, out_promote_dtype, ln_promote_dtype: ``promote_dtype``
      of the q/k/v projections, the output projection and the qk norms.
    qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls:
      the projections' contraction (see `LinearGeneral`).
    qkv_kernel_axes, out_kernel_axes: logical axes of the projection kernels
      (defaults ``("embed", "heads", "kv")`` -- ``"kv_heads"`` for grouped k/v --
      and ``("heads", "kv", "embed")``).
    keep_rngs: keep a fork of the ``dropout`` stream when dropout_rate > 0.
    activation_axes: ``"default"`` (constrain projections and the attention
      result by activation names under `use_sharding`) or None (do not).
    rngs: random streams.
    kernel_metadata, out_kernel_metadata, bias_metadata, out_bias_metadata,
    query_ln_scale_metadata, key_ln_scale_metadata: extra Param metadata
      (Flax's spelling; the out_* ones default to the q/k/v ones).

  Raises:
    ConfigError: for non-positive sizes, heads that do not divide
      qkv_features, or kv heads that do not divide the heads.

  >>> from spmdnnx._rngs import Rngs
  >>> gqa = MultiHeadAttention(4, 8, num_kv_heads=2, rngs=Rngs(0))
  >>> gqa.key.kernel.shape, gqa(jnp.ones((1, 3, 8)), is_causal=True).shape
  ((8, 2, 2), (1, 3, 8))
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, *,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               broadcast_dropout: bool = True, dropout_rate: float = 0.0,
               deterministic: bool | None = None, precision: Any = None,
               kernel_init: Callable = initializers.default_kernel_init(),
               out_kernel_init: Callable | None = None,
               bias_init: Callable = initializers.zeros,
               out_bias_init: Callable | None = None, use_bias: bool = True,
               attention_fn: Callable = dot_product_attention, decode: bool | None = None,
               normalize_qk: bool = False,
               qkv_promote_dtype: Callable = _common.promote_dtypes,
               out_promote_dtype: Callable = _common.promote_dtypes,
               ln_promote_dtype: Callable = _common.promote_dtypes,
               qkv_dot_general: Callable | None = None,
               out_dot_general: Callable | None = None,
               qkv_dot_general_cls: Any = None, out_dot_general_cls: Any = None,
               qkv_kernel_axes: Any = None, out_kernel_axes: Any = None,
               keep_rngs: bool = True, activation_axes: Any = "default", rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               out_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               out_bias_metadata: Mapping[str, Any] = _NO_METADATA,
               query_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
               key_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA):
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    in_kv_features = in_features if in_kv_features is None else in_kv_features
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _common.check_positive("MultiHeadAttention", num_heads=num_heads,
                           in_features=in_features, qkv_features=qkv_features,
                           out_features=out_features, in_kv_features=in_kv_features,
                           num_kv_heads=num_kv_heads)
    if qkv_features % num_heads:
      raise errors.ConfigError(
          f"MultiHeadAttention: qkv_features ({qkv_features}) must be divisible by "
          f"num_heads ({num_heads}); each head gets qkv_features // num_heads features.")
    if num_heads % num_kv_heads:
      raise errors.ConfigError(
          f"MultiHeadAttention: num_heads ({num_heads}) must be divisible by "
          f"num_kv_heads ({num_kv_heads}); each key/value head serves an equal group "
          "of query heads.")
    head_dim = qkv_features // num_heads
    if activation_axes is not None and activation_axes != "default":
      raise errors.ConfigError(
          f"MultiHeadAttention: activation_axes must be 'default' or None (no "
          f"constraints), got {activation_axes!r}; for another layout pass None and "
          "constrain with spmdnnx.spmd.constrain (e.g. in your attention_fn).",
          axes=activation_axes)
    _common.set_attrs(
        self, num_heads=num_heads, in_features=in_features, qkv_features=qkv_features,
        out_features=out_features, in_kv_features=in_kv_features,
        num_kv_heads=num_kv_heads, head_dim=head_dim, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, broadcast_dropout=broadcast_dropout,
        dropout_rate=dropout_rate, deterministic=deterministic, precision=precision,
        attention_fn=attention_fn, decode=decode, normalize_qk=normalize_qk,
        qkv_promote_dtype=qkv_promote_dtype, out_promote_dtype=out_promote_dtype,
        ln_promote_dtype=ln_promote_dtype, qkv_dot_general=qkv_dot_general,
        out_dot_general=out_dot_general, qkv_dot_general_cls=qkv_dot_general_cls,
        out_dot_general_cls=out_dot_general_cls,
        query_ln=None, key_ln=None, activation_axes=activation_axes)
    default_axes = not _has_axes(kernel_init) and not _has_axes_meta(kernel_metadata)
    q_axes = qkv_kernel_axes if qkv_kernel_axes is not None else (
        QKV_KERNEL_AXES if default_axes else None)
    kv_axes = q_axes
    if qkv_kernel_axes is None and default_axes and num_kv_heads != num_heads:
      kv_axes = GQA_KV_KERNEL_AXES
    proj = functools.partial(
        LinearGeneral, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        precision=precision, kernel_init=kernel_init, bias_init=bias_init,
        promote_dtype=qkv_promote_dtype, dot_general=qkv_dot_general,
        dot_general_cls=qkv_dot_general_cls, activation_axes=activation_axes, rngs=rngs,
        kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.query = proj(in_features, (num_heads, head_dim), kernel_axes=q_axes)
    self.key = proj(in_kv_features, (num_kv_heads, head_dim), kernel_axes=kv_axes)
    self.value = proj(in_kv_features, (num_kv_heads, head_dim), kernel_axes=kv_axes)
    if normalize_qk:
      def ln(metadata):
        return LayerNorm(head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                         promote_dtype=ln_promote_dtype, rngs=rngs, scale_metadata=metadata,
                         scale_axes=None if _has_axes_meta(metadata) else ("kv",))

      self.query_ln = ln(query_ln_scale_metadata)
      self.key_ln = ln(key_ln_scale_metadata)
    out_init = _first(out_kernel_init, kernel_init)
    out_meta = out_kernel_metadata or kernel_metadata
    out_axes = out_kernel_axes if out_kernel_axes is not None else (
        None if _has_axes(out_init) or _has_axes_meta(out_meta) else OUT_KERNEL_AXES)
    self.out = LinearGeneral(
        (num_heads, head_dim), out_features, axis=(-2, -1), use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=out_init,
        bias_init=_first(out_bias_init, bias_init), promote_dtype=out_promote_dtype,
        dot_general=out_dot_general, dot_general_cls=out_dot_general_cls,
        kernel_axes=out_axes, activation_axes=activation_axes, rngs=rngs,
        kernel_metadata=out_meta, bias_metadata=out_bias_metadata or bias_metadata)
    self.rngs = own_stream(rngs, "dropout") if keep_rngs and dropout_rate > 0 else None
    _common.set_attrs(self, cached_key=None, cached_value=None, cache_index=None)

  def init_cache(self, input_shape: tuple, dtype: Any = jnp.float32) -> None:
    """Creates zeroed `Cache`s for decoding inputs of shape ``(*batch, max_len, features)``.

    Creates ``cached_key``/``cached_value`` of shape
    ``(*batch, max_len, num_kv_heads, head_dim)`` and ``cache_index`` (0).
    """
    shape = tuple(input_shape[:-1]) + (self.num_kv_heads, self.head_dim)
    axes = None
    if len(shape) == 4:
      axes = CACHE_AXES if self.num_kv_heads == self.num_heads else GQA_CACHE_AXES
    self.cached_key = Cache(jnp.zeros(shape, dtype), logical_axes=axes)
    self.cached_value = Cache(jnp.zeros(shape, dtype), logical_axes=axes)
    self.cache_index = Cache(jnp.array(0, dtype=jnp.int32))

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
               batch_size: int | tuple | None = None,
               max_length: int | None = None) -> None:
    """Sets the mode attributes; ``decode=True`` without a cache creates one.

    Raises:
      ConfigError: ``decode=True`` with no cache and no ``batch_size``/``max_length``.
    """
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode
      if decode and self.cached_key is None:
        if batch_size is None or max_length is None:
          raise errors.ConfigError(
              f"{_common.layer_name(self)}: decode=True needs a cache; pass "
              "batch_size= and max_length= to create it (or call init_cache).")
        batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
        self.init_cache(batch + (max_length, self.in_features),
                        self.dtype or jnp.float32)

  def _decode_step(self, key, value, mask):
    if self.cached_key is None:
      raise errors.ConfigError(
          f"{_common.layer_name(self)}: decode=True needs a cache; call "
          "init_cache((batch, max_length, in_features)) first.")
    cached = self.cached_key.value.shape
    expected = cached[:-3] + (1,) + cached[-2:]
    if key.shape != expected:
      raise errors.ShapeError(
          f"{_common.layer_name(self)}: decoding takes one token per call: expected "
          f"projected keys of shape {expected}, got {tuple(key.shape)} (input length "
          f"{key.shape[-3]}); the cache was made for shape {cached}.")
    index = self.cache_index.value
    zero = jnp.zeros((), index.dtype)  # one index dtype, also with x64 enabled
    start = (zero,) * (len(cached) - 3) + (index, zero, zero)
    key = lax.dynamic_update_slice(
        self.cached_key.value, key.astype(self.cached_key.dtype), start)
    value = lax.dynamic_update_slice(
        self.cached_value.value, value.astype(self.cached_value.dtype), start)
    self.cached_key.value, self.cached_value.value = key, value
    self.cache_index.value = index + 1
    max_len = cached[-3]
    visible = jnp.arange(max_len) <= index
    visible = jnp.broadcast_to(visible, cached[:-3] + (1, 1, max_len))
    return key, value, combine_masks(mask, visible, dtype=bool)

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               deterministic: bool | None = None, rngs: Any = None,
               sow_weights: bool = False, decode: bool | None = None,
               is_causal: bool = False, out_sharding: Any = None,
               qkv_sharding: Any = None):
    """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v`` (default: self-attention).

    ``is_causal`` adds a causal mask; ``qkv_sharding`` and ``out_sharding``
    (`PartitionSpec`s, explicit-axes meshes) choose the sharding of the
    projected q/k/v and of the output.

    Raises:
      ShapeError: for inputs whose feature size differs from the layer's.
      ConfigError: decoding without a cache, or dropout without rngs.
    """
    if inputs_k is None:
      if inputs_v is not None:
        raise errors.ConfigError(
            f"{_common.layer_name(self)}: inputs_v given without inputs_k; pass "
            "inputs_k too (or neither, for self-attention).")
      inputs_k = inputs_q
    inputs_v = inputs_k if inputs_v is None else inputs_v
    _common.check_features(self, inputs_q, -1, self.in_features, "in features")
    _common.check_features(self, inputs_k, -1, self.in_kv_features, "in kv features")
    _common.check_features(self, inputs_v, -1, self.in_kv_features, "in kv features")
    query = self.query(inputs_q, out_sharding=qkv_sharding)
    key = self.key(inputs_k, out_sharding=qkv_sharding)
    value = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)
    if _first(decode, self.decode, False):
      key, value, mask = self._decode_step(key, value, mask)
    dropout_rng = None
    if self.dropout_rate > 0.0:
      deterministic = _first(deterministic, self.deterministic)
      if deterministic is None:
        raise errors.ConfigError(
            f"{_common.layer_name(self)}: dropout_rate > 0, so say whether to apply "
            "it: pass deterministic=True/False at construction or call time (or use "
            "model.train()/model.eval()).")
      if not deterministic:
        dropout_rng = draw_key("MultiHeadAttention", "dropout", rngs, self.rngs)
    else:
      deterministic = True
    kwargs = {"is_causal": True} if is_causal else {}
    x = self.attention_fn(
        query, key, value, mask=mask, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
        deterministic=deterministic, dtype=self.dtype, precision=self.precision,
        module=self if sow_weights else None, **kwargs)
    if self.activation_axes is not None and x.ndim == 4 and out_sharding is None:
      x = layout_activation(x, ("activation_batch", "activation_length", "activation_heads",
                                "activation_head_dim"))
    return self.out(x, out_sharding=out_sharding)
