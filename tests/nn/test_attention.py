"""Attention: reference numerics, masks, dropout, decode cache, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply, param_grads

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import (MultiHeadAttention, combine_masks, dot_product_attention,
                        initializers, make_attention_mask, make_causal_mask)


def _x(shape, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape))


def attention_ref(q, k, v, mask=None):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_dot_product_attention_matches_reference_with_mask():
  q, k, v = _x((2, 3, 2, 4), 0), _x((2, 5, 2, 4), 1), _x((2, 5, 2, 4), 2)
  mask = make_attention_mask(jnp.array([[1, 1, 1], [1, 1, 0]]), jnp.array([[1, 1, 1, 0, 0]] * 2))
  assert mask.shape == (2, 1, 3, 5)
  attend = jax.jit(dot_product_attention)
  out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask)
  close(out[0], attention_ref(q, k, v, np.asarray(mask) > 0)[0], 1e-5)
  out16 = attend(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  assert out16.dtype == jnp.bfloat16
  close(out16, attention_ref(q, k, v), 5e-2)


def test_masks():
  causal = make_causal_mask(jnp.ones((1, 3)))
  np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((3, 3))))
  both = combine_masks(causal, None, jnp.ones((1, 1, 3, 3)) * jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_array_equal(both[0, 0], np.tril(np.ones((3, 3))) * [1, 1, 0])
  assert combine_masks(None, None) is None
  with pytest.raises(errors.ShapeError, match="masks must have the same rank"):
    combine_masks(jnp.ones((3, 3)), jnp.ones((1, 3, 3)))


def _manual_mha(mha, xq, xkv, mask=None):
  def proj(layer, x):
    return np.einsum("bte,ehd->bthd", x, np.asarray(layer.kernel.value)) + np.asarray(layer.bias.value)
  q, k, v = proj(mha.query, xq), proj(mha.key, xkv), proj(mha.value, xkv)
  o = attention_ref(q, k, v, mask)
  return np.einsum("bthd,hde->bte", o, np.asarray(mha.out.kernel.value)) + np.asarray(mha.out.bias.value)


def test_mha_self_and_cross_attention_match_reference():
  mha = MultiHeadAttention(2, 6, qkv_features=4, out_features=5, in_kv_features=3,
                           bias_init=initializers.normal(0.5), rngs=nnx.Rngs(0))
  assert mha.query.kernel.shape == (6, 2, 2) and mha.key.kernel.shape == (3, 2, 2)
  assert mha.out.kernel.logical_axes == ("heads", "kv", "embed")
  assert mha.query.bias.logical_axes == ("heads", "kv") and mha.out.bias.logical_axes == ("embed",)
  xq, xkv = _x((2, 4, 6), 3), _x((2, 3, 3), 4)
  out = jit_apply(mha, lambda m, q, kv: m(q, kv), jnp.asarray(xq), jnp.asarray(xkv))
  close(out, _manual_mha(mha, xq, xkv), 1e-4)
  self_attn = MultiHeadAttention(2, 4, rngs=nnx.Rngs(1))
  x = _x((1, 3, 4), 5)
  mask = make_causal_mask(jnp.ones((1, 3)))
  ref = _manual_mha(self_attn, x, x, np.asarray(mask) > 0)
  close(jit_apply(self_attn, lambda m, x, mk: m(x, mask=mk), jnp.asarray(x), mask), ref, 1e-4)
  g = param_grads(self_attn, lambda m: jnp.sum(m(jnp.asarray(x))))
  close(g["out"]["bias"].value, np.full((4,), 3.0), 1e-5)


def test_mha_decode_with_cache_equals_causal_attention():
  mha = MultiHeadAttention(2, 8, decode=False, normalize_qk=True, rngs=nnx.Rngs(0))
  x = jnp.asarray(_x((2, 5, 8), 7))
  full = jit_apply(mha, lambda m, x: m(x, mask=make_causal_mask(jnp.ones((2, 5)))), x)
  mha.init_cache(x.shape)
  assert isinstance(mha.cached_key, nnx.Cache)
  assert mha.cached_key.logical_axes == ("batch", "length", "heads", "kv")
  for t in range(5):
    step = jit_apply(mha, lambda m, xt: m(xt, decode=True), x[:, t:t + 1])
    close(step[:, 0], full[:, t], 1e-5)
  assert int(mha.cache_index.value) == 5


def test_mha_dropout_train_vs_eval_and_sow():
  mha = MultiHeadAttention(2, 4, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
  x = jnp.asarray(_x((1, 3, 4)))
  with pytest.raises(errors.ConfigError, match="dropout_rate > 0, so say whether to apply it"):
    mha(x)
  mha.eval()
  a = jit_apply(mha, lambda m, x: m(x), x)
  b = jit_apply(mha, lambda m, x: m(x), x)
  np.testing.assert_array_equal(a, b)
  mha.train()
  c = jit_apply(mha, lambda m, x: m(x), x)
  d = jit_apply(mha, lambda m, x: m(x), x)
  assert not np.allclose(c, d)
  mha.eval()
  jit_apply(mha, lambda m, x: m(x, sow_weights=True), x)
  (weights,) = mha.attention_weights.value
  close(weights.sum(-1), np.ones((1, 2, 3)), 1e-5)


def test_mha_bf16_compute():
  mha = MultiHeadAttention(2, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = _x((1, 3, 4))
  y = jit_apply(mha, lambda m, x: m(x), jnp.asarray(x))
  assert y.dtype == jnp.bfloat16 and mha.query.kernel.dtype == jnp.float32
  close(y, _manual_mha(mha, x, x), 1e-1)


def test_mha_with_partitioning_and_errors():
  init = nnx.with_partitioning(initializers.lecun_normal(), ("embed", None, None))
  mha = MultiHeadAttention(2, 4, kernel_init=init, rngs=nnx.Rngs(0))
  assert mha.query.kernel.logical_axes == ("embed", None, None)
  with pytest.raises(errors.ConfigError, match=r"qkv_features \(6\) must be divisible by num_heads \(4\)"):
    MultiHeadAttention(4, 6, rngs=nnx.Rngs(0))
  mha = MultiHeadAttention(2, 4, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match=r"MultiHeadAttention: expected an input whose axis -1 "
                                              r"has 4 in features, got shape \(1, 3, 5\)"):
    mha(jnp.ones((1, 3, 5)))
  with pytest.raises(errors.ConfigError, match=r"call init_cache"):
    mha(jnp.ones((1, 1, 4)), decode=True)
  mha.init_cache((1, 4, 4))
  with pytest.raises(errors.ShapeError, match=r"decoding takes one token per call"):
    mha(jnp.ones((1, 2, 4)), decode=True)


# --- grouped-query attention, is_causal, Flax keywords ------------------------


def test_grouped_query_attention_equals_repeating_kv_heads():
  from spmdnnx.nn import dot_product_attention
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 3, 4, 5))
  k = jax.random.normal(ks[1], (2, 6, 2, 5))
  v = jax.random.normal(ks[2], (2, 6, 2, 5))
  out = dot_product_attention(q, k, v)
  # query heads 0,1 use kv head 0; heads 2,3 use kv head 1
  ref = dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(errors.ShapeError, match=r"query heads \(4\) must be a multiple of the "
                                              r"key heads \(3\)"):
    dot_product_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
  with pytest.raises(errors.ShapeError, match="key and value lengths must match"):
    dot_product_attention(q, k, v[:, :5])
  with pytest.raises(errors.ShapeError, match="query and key depths must match"):
    dot_product_attention(q, k[..., :4], v)


def test_is_causal_equals_a_causal_mask():
  from spmdnnx.nn import dot_product_attention, make_causal_mask
  ks = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 4, 2, 3)) for key in ks)
  mask = make_causal_mask(jnp.ones((1, 4)), dtype=bool)
  np.testing.assert_allclose(dot_product_attention(q, k, v, is_causal=True),
                             dot_product_attention(q, k, v, mask=mask), rtol=1e-6)
  pad = jnp.array([True, True, False, True])[None, None, None, :]
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask=pad, is_causal=True),
                             dot_product_attention(q, k, v, mask=jnp.logical_and(mask, pad)),
                             rtol=1e-6)
  mha = MultiHeadAttention(2, 6, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 4, 6))
  np.testing.assert_allclose(mha(x, is_causal=True), mha(x, mask=mask), rtol=1e-5)


def test_mha_num_kv_heads_shapes_cache_and_errors():
  mha = MultiHeadAttention(4, 8, num_kv_heads=2, rngs=nnx.Rngs(0))
  assert mha.query.kernel.shape == (8, 4, 2) and mha.key.kernel.shape == (8, 2, 2)
  assert mha.key.kernel.logical_axes == ("embed", "kv_heads", "kv")
  assert mha.query.kernel.logical_axes == ("embed", "heads", "kv")
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  full = mha(x, is_causal=True)
  mha.init_cache((1, 3, 8))
  assert mha.cached_key.shape == (1, 3, 2, 2)
  steps = [mha(x[:, i:i + 1], decode=True) for i in range(3)]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
  with pytest.raises(errors.ConfigError, match=r"num_heads \(4\) must be divisible by "
                                               r"num_kv_heads \(3\)"):
    MultiHeadAttention(4, 8, num_kv_heads=3, rngs=nnx.Rngs(0))


def test_mha_set_view_and_flax_keywords():
  mha = MultiHeadAttention(2, 4, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": ("embed",)},
                           normalize_qk=True, query_ln_scale_metadata={"note": "q"},
                           key_ln_scale_metadata={"out_sharding": ("norm",)})
  assert mha.query.kernel.logical_axes == ("embed", None, None)
  assert mha.out.kernel.logical_axes == ("embed", None, None)  # out_* default to kernel_*
  assert mha.query_ln.scale.get_metadata()["note"] == "q"
  assert mha.query_ln.scale.logical_axes == ("kv",) and mha.key_ln.scale.logical_axes == ("norm",)
  with pytest.raises(errors.ConfigError, match="decode=True needs a cache; pass batch_size="):
    mha.set_view(decode=True)
  mha.set_view(decode=True, deterministic=True, batch_size=3, max_length=5)
  assert mha.cached_key.shape == (3, 5, 2, 2) and mha.decode and mha.deterministic
