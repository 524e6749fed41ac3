"""Autoregressive sampling with a KV cache, in one compiled program.

`generate` runs the prompt through the model once (prefill, filling the
cache), then produces one token per step inside `nnx.fori_loop`, all under
one `nnx.jit`; under `use_sharding` the parameters, cache and activations are
laid out by the rules. Temperature 0 is greedy decoding.

>>> import jax, jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.models._config import LMConfig
>>> from spmdnnx.models._llama import DecoderLM
>>> cfg = LMConfig(vocab_size=16, embed_dim=8, num_layers=1, num_heads=2,
...                num_kv_heads=1, head_dim=4, mlp_dim=16, max_seq_len=32)
>>> model = DecoderLM(cfg, rngs=Rngs(0))
>>> out = generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4, rng=jax.random.key(0))
>>> out.shape, bool((out[:, :3] == jnp.array([[1, 2, 3]])).all())
((1, 7), True)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from spmdnnx import errors
from spmdnnx._transforms import fori_loop
from spmdnnx._transforms import jit
from spmdnnx.models._cache import check_cache_size
from spmdnnx.models._cache import KVCache
from spmdnnx.spmd._constrain import constrain
from spmdnnx.spmd._context import current_context
from spmdnnx.spmd._init import sharded_init

_TOKENS = ("activation_batch", "activation_length")


def init_cache(model: Any, batch_size: int, max_len: int) -> KVCache:
  """An empty `KVCache` for ``model`` (a `DecoderLM` or `MlpLM`).

  Inside `use_sharding` the cache is created directly in its sharded layout
  (no full copy on one device).

  Args:
    model: the model the cache is for (its ``config`` sets the shapes).
    batch_size: sequences decoded together.
    max_len: positions to hold: prompt length + tokens to generate.

  Raises:
    ConfigError: if ``model`` has no LMConfig.
    ShapeError: for non-positive sizes or ``max_len > max_seq_len``.
  """
  cfg = _config_of(model)
  check_cache_size(cfg, batch_size, max_len)
  if current_context() is not None:
    return sharded_init(lambda: KVCache(cfg, batch_size=batch_size, max_len=max_len))
  return KVCache(cfg, batch_size=batch_size, max_len=max_len)


def generate(model: Any, prompt: jax.Array, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
  """Samples ``max_new_tokens`` continuation tokens of ``prompt``.

  Args:
    model: a `DecoderLM` or `MlpLM`.
    prompt: ``int[B, T0]`` token ids (every row has the same length T0 >= 1).
    max_new_tokens: tokens to append (>= 0); ``T0 + max_new_tokens`` must
      not exceed the model's ``max_seq_len``.
    rng: a JAX PRNG key; the same key gives the same tokens.
    temperature: softmax temperature; 0 picks the most likely token (greedy).
    top_k: sample only among the ``top_k`` most likely tokens (None: all).

  Returns:
    ``int32[B, T0 + max_new_tokens]``: the prompt followed by the new tokens.

  Raises:
    ShapeError: a prompt that is not ``int[B, T0]`` with T0 >= 1, or too long
      a total length.
    ConfigError: a negative ``max_new_tokens`` or ``temperature``, or
      ``top_k`` outside ``[1, vocab_size]``.
  """
  cfg = _config_of(model)
  shape = tuple(jnp.shape(prompt))
  if len(shape) != 2 or shape[1] < 1 or not jnp.issubdtype(jnp.result_type(prompt),
                                                              jnp.integer):
    raise errors.ShapeError(
        f"generate: prompt must be integer ids of shape [batch, length >= 1], got "
        f"{jnp.result_type(prompt)}{list(shape)}.", shapes=[shape])
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
      or max_new_tokens < 0:
    raise errors.ConfigError(
        f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
      or not temperature >= 0:
    raise errors.ConfigError(
        f"generate: temperature must be a number >= 0 (0 = greedy), got {temperature!r}.")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                            or not 1 <= top_k <= cfg.vocab_size):
    raise errors.ConfigError(
        f"generate: top_k must be None or an int in [1, vocab_size={cfg.vocab_size}], got "
        f"{top_k!r}.")
  total = shape[1] + max_new_tokens
  if total > cfg.max_seq_len:
    raise errors.ShapeError(
        f"generate: prompt length {shape[1]} + max_new_tokens {max_new_tokens} = {total} "
        f"exceeds the model's max_seq_len={cfg.max_seq_len}; generate fewer tokens, shorten "
        "the prompt, or build the model with a larger max_seq_len.", shapes=[shape])
  # Static arguments go by position: nnx.jit under use_sharding takes no kwargs.
  return _generate(model, jnp.asarray(prompt).astype(jnp.int32), rng, max_new_tokens,
                   float(temperature), top_k)


def sample_token(logits: jax.Array, key: jax.Array, temperature: float,
                 top_k: int | None) -> jax.Array:
  """One token id per row of ``logits`` (``[B, V]``): greedy at temperature 0."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / jnp.float32(temperature)
  if top_k is not None:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jit(static_argnums=(3, 4, 5))
def _generate(model: Any, prompt: jax.Array, rng: jax.Array, max_new_tokens: int,
              temperature: float, top_k: int | None) -> jax.Array:
  batch, length = prompt.shape
  total = length + max_new_tokens
  out = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(prompt)
  if max_new_tokens == 0:
    return out
  # Created inside the program: laid out by the rules, never held outside.
  cache = KVCache(model.config, batch_size=batch, max_len=total)
  logits = model(prompt, cache=cache)
  token = sample_token(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)
  out = constrain(out.at[:, length].set(token), _TOKENS)

  def step(i, val):
    model, cache, out, token = val
    logits = model(token[:, None], cache=cache)
    token = sample_token(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k)
    out = lax.dynamic_update_slice(out, token[:, None], (0, length + i))
    return model, cache, constrain(out, _TOKENS), token

  _, _, out, _ = fori_loop(1, max_new_tokens, step, (model, cache, out, token))
  return out


def _config_of(model: Any) -> Any:
  cfg = getattr(model, "config", None)
  if cfg is None or not hasattr(cfg, "max_seq_len"):
    raise errors.ConfigError(
        f"expected a model built by spmdnnx.models (with an LMConfig `config`), got "
        f"{type(model).__name__}.")
  return cfg

