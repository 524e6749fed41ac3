"""KV-cache decoding and generate: cache == full forward, greedy, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import models
from lm_helpers import tiny, tokens


@pytest.mark.parametrize("cfg", [tiny(), tiny(scan_layers=False), tiny(dtype="bfloat16"),
                                 tiny(kind="mlp")],
                         ids=["stack", "list", "bf16", "mlp"])
def test_decoding_with_the_cache_equals_the_full_forward(cfg):
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  t = tokens((2, 9))
  full = model(t)
  cache = models.init_cache(model, 2, 12)
  assert int(cache.index.value) == 0
  pieces = [model(t[:, :4], cache=cache)]           # prefill 4
  for i in range(4, 9):                              # then one token at a time
    pieces.append(model(t[:, i:i + 1], cache=cache))
  assert int(cache.index.value) == 9
  atol = 5e-2 if cfg.dtype == "bfloat16" else 2e-5
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=atol)


def test_cache_layout_and_axes():
  cfg = tiny()
  cache = models.init_cache(models.build_model(cfg, rngs=nnx.Rngs(0)), 3, 10)
  assert cache.k.value.shape == (2, 3, 10, 2, 8) and cache.k.value.dtype == jnp.float32
  assert cache.k.logical_axes == ("layers", "activation_batch", "activation_length",
                                  "activation_kv_heads", "activation_head_dim")
  assert isinstance(cache.k, nnx.Cache) and isinstance(cache.index, nnx.Cache)
  mlp_cache = models.init_cache(models.build_model(tiny(kind="mlp"), rngs=nnx.Rngs(0)), 3, 10)
  assert mlp_cache.k is None


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_greedy_generate_is_deterministic_and_follows_argmax(kind):
  model = models.build_model(tiny(kind=kind), rngs=nnx.Rngs(0))
  prompt = tokens((4, 3))
  out = models.generate(model, prompt, max_new_tokens=6, rng=jax.random.key(0),
                        temperature=0.0)
  again = models.generate(model, prompt, max_new_tokens=6, rng=jax.random.key(9),
                          temperature=0)
  assert out.shape == (4, 9) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, again)
  np.testing.assert_array_equal(out[:, :3], prompt)
  # Every new token is the argmax of the full forward pass over what precedes it.
  np.testing.assert_array_equal(jnp.argmax(model(out[:, :-1])[:, 2:], axis=-1), out[:, 3:])


def test_sampling_uses_the_key_and_top_k():
  model = models.build_model(tiny(), rngs=nnx.Rngs(0))
  prompt = tokens((4, 2))
  gen = lambda key, **kw: models.generate(model, prompt, max_new_tokens=8,
                                          rng=jax.random.key(key), **kw)
  np.testing.assert_array_equal(gen(1), gen(1))
  assert not bool((gen(1) == gen(2)).all())
  # top_k=1 leaves only the most likely token: greedy.
  np.testing.assert_array_equal(gen(3, top_k=1), gen(0, temperature=0.0))
  # top_k=3: every sampled token is among the 3 most likely under the full forward pass.
  out = gen(4, top_k=3, temperature=2.0)
  logits = model(out[:, :-1])[:, 1:]
  top3 = jax.lax.top_k(logits, 3)[1]
  assert bool((top3 == out[:, 2:, None]).any(-1).all())


def test_zero_new_tokens_returns_the_prompt():
  model = models.build_model(tiny(), rngs=nnx.Rngs(0))
  prompt = tokens((2, 5))
  np.testing.assert_array_equal(
      models.generate(model, prompt, max_new_tokens=0, rng=jax.random.key(0)), prompt)


def test_generate_and_cache_errors():
  model = models.build_model(tiny(), rngs=nnx.Rngs(0))
  key = jax.random.key(0)
  prompt = tokens((2, 3))
  with pytest.raises(errors.ShapeError, match=r"prompt must be integer ids .* float32\[2, 3\]"):
    models.generate(model, jnp.zeros((2, 3)), max_new_tokens=2, rng=key)
  with pytest.raises(errors.ShapeError, match=r"length >= 1\], got int32\[2, 0\]"):
    models.generate(model, jnp.zeros((2, 0), jnp.int32), max_new_tokens=2, rng=key)
  with pytest.raises(errors.ConfigError, match="max_new_tokens must be an int >= 0, got -1"):
    models.generate(model, prompt, max_new_tokens=-1, rng=key)
  with pytest.raises(errors.ConfigError, match="temperature must be a number >= 0"):
    models.generate(model, prompt, max_new_tokens=2, rng=key, temperature=-0.5)
  with pytest.raises(errors.ConfigError, match=r"top_k must be None or an int in \[1, "
                     r"vocab_size=32\], got 33"):
    models.generate(model, prompt, max_new_tokens=2, rng=key, top_k=33)
  with pytest.raises(errors.ShapeError, match="3 \\+ max_new_tokens 14 = 17 exceeds the "
                     "model's max_seq_len=16"):
    models.generate(model, prompt, max_new_tokens=14, rng=key)
  with pytest.raises(errors.ConfigError, match="expected a model built by spmdnnx.models"):
    models.generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), prompt, max_new_tokens=1, rng=key)
  with pytest.raises(errors.ShapeError, match="max_len=20 exceeds the model's max_seq_len=16"):
    models.init_cache(model, 2, 20)
  with pytest.raises(errors.ShapeError, match="batch_size must be a positive int, got 0"):
    models.init_cache(model, 0, 4)
  cache = models.init_cache(model, 2, 4)
  with pytest.raises(errors.ShapeError, match="5 tokens exceed the cache's max_len=4"):
    model(tokens((2, 5)), cache=cache)
  with pytest.raises(errors.ShapeError, match="the cache holds a batch of 2 sequences but the "
                     "tokens have batch 3"):
    model(tokens((3, 1)), cache=cache)
  model(tokens((2, 3)), cache=cache)
  with pytest.raises(errors.ShapeError, match=r"the cache is full: 3 positions written \+ 2 "
                     "new > max_len=4"):
    model(tokens((2, 2)), cache=cache)


def test_overflowing_the_cache_inside_jit_gives_nan_not_wrong_logits():
  model = models.build_model(tiny(), rngs=nnx.Rngs(0))
  cache = models.init_cache(model, 2, 4)
  step = nnx.jit(lambda m, c, t: m(t, cache=c))
  assert bool(jnp.isfinite(step(model, cache, tokens((2, 3)))).all())
  assert bool(jnp.isfinite(step(model, cache, tokens((2, 1)))).all())     # fills position 3
  assert bool(jnp.isnan(step(model, cache, tokens((2, 1)))).all())        # no room left


def test_generate_under_sharding_equals_unsharded():
  cfg = tiny()
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  prompt = tokens((4, 3))
  want = models.generate(model, prompt, max_new_tokens=5, rng=jax.random.key(0),
                         temperature=0.0)
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    sharded = nnx.sharded_init(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
    got = models.generate(sharded, prompt, max_new_tokens=5, rng=jax.random.key(0),
                          temperature=0.0)
    cache = models.init_cache(sharded, 4, 8)
  np.testing.assert_array_equal(got, want)
  assert got.sharding.spec[0] == "fsdp"                      # batch over the batch axes
  # The cache is born sharded: batch over (data, fsdp), kv heads over tensor.
  assert cache.k.value.sharding.spec == jax.sharding.PartitionSpec(
      None, ("data", "fsdp"), None, "tensor", None)
  assert cache.k.value.addressable_shards[0].data.shape == (2, 1, 8, 1, 8)
