"""Embed: lookup, attend, dtypes, axes and errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply, param_grads

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import Embed, initializers


def test_lookup_and_attend_match_reference():
  emb = Embed(6, 3, rngs=nnx.Rngs(0))
  table = np.asarray(emb.embedding.value)
  ids = jnp.array([[0, 5, 2], [1, 1, 4]])
  close(emb(ids), table[np.asarray(ids)])
  q = jnp.ones((2, 3))
  close(emb.attend(q), np.ones((2, 3)) @ table.T, 1e-5)
  close(jit_apply(emb, lambda m, i: m(i), ids), table[np.asarray(ids)])


def test_embedding_gradient_scatters_into_rows():
  emb = Embed(4, 2, rngs=nnx.Rngs(0))
  ids = jnp.array([1, 1, 3])
  g = param_grads(emb, lambda m: jnp.sum(m(ids)))["embedding"].value
  close(g, [[0, 0], [2, 2], [0, 0], [1, 1]])


def test_default_and_custom_axes():
  assert Embed(4, 2, rngs=nnx.Rngs(0)).embedding.logical_axes == ("vocab", "embed")
  assert Embed(4, 2, embedding_axes=(None, None), rngs=nnx.Rngs(0)).embedding.logical_axes == (None, None)
  init = nnx.with_partitioning(initializers.normal(), ("vocab", None))
  assert Embed(4, 2, embedding_init=init, rngs=nnx.Rngs(0)).embedding.logical_axes == ("vocab", None)


def test_dtypes():
  emb = Embed(4, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert emb.embedding.dtype == jnp.float32
  assert emb(jnp.array([1])).dtype == jnp.bfloat16
  assert emb.attend(jnp.ones((1, 2))).dtype == jnp.bfloat16
  emb16 = Embed(4, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert emb16(jnp.array([1])).dtype == jnp.bfloat16


def test_errors():
  with pytest.raises(errors.ConfigError, match=r"Embed: num_embeddings must be a positive int"):
    Embed(-1, 2, rngs=nnx.Rngs(0))
  emb = Embed(4, 2, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match=r"Embed: expected integer ids, got an input of dtype float32"):
    emb(jnp.ones((2,)))
  with pytest.raises(errors.ShapeError, match=r"Embed: expected an input whose axis -1 has 2 features"):
    emb.attend(jnp.ones((2, 3)))


def test_embed_single_row_broadcasts_and_out_of_range_ids_give_nan():
  one = Embed(1, 3, rngs=nnx.Rngs(0))
  y = one(jnp.array([0, 5, -2]))
  close(y, np.broadcast_to(np.asarray(one.embedding.value), (3, 3)))
  emb = Embed(4, 2, rngs=nnx.Rngs(0))
  y = emb(jnp.array([1, 4, 9]))
  close(y[0], emb.embedding.value[1])
  # a silent clip would hide a data bug: out-of-range rows are NaN, as in Flax
  assert bool(jnp.all(jnp.isnan(y[1:])))


def test_embed_dtype_promote_dtype_and_metadata():
  emb = Embed(4, 2, param_dtype=jnp.bfloat16, embedding_metadata={"out_sharding": ("vocab",)},
              rngs=nnx.Rngs(0))
  assert emb.dtype == jnp.bfloat16 and emb.embedding.logical_axes == ("vocab", None)
  assert emb(jnp.array([1])).dtype == jnp.bfloat16
  seen = []

  def keep(arrays, dtype=None, inexact=True):
    seen.append(inexact)
    return arrays

  emb = Embed(4, 2, promote_dtype=keep, rngs=nnx.Rngs(0))
  emb(jnp.array([0]))
  emb.attend(jnp.ones((1, 2)))
  assert seen == [False, True]
