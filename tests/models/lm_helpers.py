"""Tiny configs shared by the model tests."""

import jax
import jax.numpy as jnp

from spmdnnx import models


def tiny(**changes):
  """A 2-layer GQA decoder small enough for a CPU test (heads 4, kv heads 2)."""
  base = dict(vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=32, max_seq_len=16)
  base.update(changes)
  return models.LMConfig(**base)


def tokens(shape=(2, 6), seed=1, vocab=32):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)
