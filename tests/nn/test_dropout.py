"""Dropout: masks in training, identity in eval, inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import jit_apply

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import Dropout


def test_train_masks_scale_and_advance_inside_jit():
  drop = Dropout(0.5, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((64, 64))
  y1 = np.asarray(jit_apply(drop, lambda m, x: m(x), x))
  y2 = np.asarray(jit_apply(drop, lambda m, x: m(x), x))
  assert set(np.unique(y1)) <= {0.0, 2.0}
  assert 0.4 < (y1 == 0).mean() < 0.6
  assert not np.array_equal(y1, y2)   # the layer's own stream advanced


def test_eval_is_identity_and_call_argument_wins():
  drop = Dropout(0.5, rngs=nnx.Rngs(0))
  x = jnp.arange(1.0, 5.0)
  drop.eval()
  np.testing.assert_array_equal(jit_apply(drop, lambda m, x: m(x), x), x)
  y = drop(jnp.ones((100,)), deterministic=False)
  assert (np.asarray(y) == 0).any()
  drop.train()
  np.testing.assert_array_equal(drop(x, deterministic=True), x)


def test_call_time_rngs_and_broadcast_dims():
  drop = Dropout(0.5, broadcast_dims=(0,))
  y = np.asarray(drop(jnp.ones((4, 32)), rngs=nnx.Rngs(dropout=3)))
  assert (y == y[0]).all()
  a = drop(jnp.ones((4, 32)), rngs=jax.random.key(1))
  b = drop(jnp.ones((4, 32)), rngs=jax.random.key(1))
  np.testing.assert_array_equal(a, b)


def test_rate_edges_and_dtype():
  x = jnp.ones((3,), jnp.bfloat16)
  assert Dropout(0.0)(x).dtype == jnp.bfloat16
  out = Dropout(0.5, rngs=nnx.Rngs(0))(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(Dropout(1.0, rngs=nnx.Rngs(0))(x), jnp.zeros(3))


def test_errors():
  with pytest.raises(errors.ConfigError, match=r"Dropout: rate must be a probability in \[0, 1\], got 1.5"):
    Dropout(1.5)
  with pytest.raises(errors.ConfigError, match=r"no `rngs` argument was provided to Dropout: random dropout needs a key. Pass rngs=nnx.Rngs\(dropout=0\)"):
    Dropout(0.5)(jnp.ones(3))
