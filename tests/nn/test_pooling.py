"""Pooling against numpy window loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close

from spmdnnx import errors
from spmdnnx.nn import avg_pool, max_pool, min_pool


def _windows(x, k, s):
  b, h, w, c = x.shape
  oh, ow = (h - k) // s + 1, (w - k) // s + 1
  return np.stack([np.stack([x[:, i * s:i * s + k, j * s:j * s + k] for j in range(ow)], 1)
                   for i in range(oh)], 1)  # (b, oh, ow, k, k, c)


def test_pools_match_reference():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 5, 3)))
  win = _windows(x, 2, 1)
  close(max_pool(jnp.asarray(x), (2, 2)), win.max((3, 4)))
  close(min_pool(jnp.asarray(x), (2, 2)), win.min((3, 4)))
  close(avg_pool(jnp.asarray(x), (2, 2)), win.mean((3, 4)), 1e-6)
  close(max_pool(jnp.asarray(x), (3, 3), strides=(2, 2)), _windows(x, 3, 2).max((3, 4)))
  g = jax.grad(lambda x: avg_pool(x, (2, 2), strides=(2, 2)).sum())(jnp.ones((1, 4, 4, 1)))
  close(g, np.full((1, 4, 4, 1), 0.25))


def test_same_padding_counts_and_unbatched():
  x = jnp.ones((4, 1))
  close(avg_pool(x, (3,), padding="SAME")[:, 0], [2 / 3, 1, 1, 2 / 3], 1e-6)
  close(avg_pool(x, (3,), padding="SAME", count_include_pad=False)[:, 0], [1, 1, 1, 1], 1e-6)
  assert max_pool(jnp.ones((2, 3, 6, 1)), (2,), padding=((0, 1),)).shape == (2, 3, 6, 1)
  assert max_pool(jnp.arange(4).reshape(1, 4, 1), (2,))[0, :, 0].tolist() == [1, 2, 3]
  assert avg_pool(jnp.ones((1, 4, 1), jnp.bfloat16), (2,)).dtype == jnp.bfloat16


def test_pool_errors():
  with pytest.raises(errors.ConfigError, match=r"pool: padding 'FULL' must be"):
    max_pool(jnp.ones((1, 4, 1)), (2,), padding="FULL")
  with pytest.raises(errors.ShapeError, match=r"a 2-d window needs an input of shape"):
    max_pool(jnp.ones((4, 1)), (2, 2))
  with pytest.raises(errors.ConfigError, match=r"window_shape must be a positive int"):
    max_pool(jnp.ones((1, 4, 1)), (0,))
  with pytest.raises(errors.ConfigError, match=r"pool: explicit padding \(\(0, 0\),\) must have one "
                                               r"\(low, high\) pair per spatial dimension \(2\)") as e:
    avg_pool(jnp.ones((1, 4, 4, 1)), (2, 2), padding=((0, 0),))
  assert e.value.argument == "padding"
  with pytest.raises(errors.ShapeError, match="a 2-d window") as e:
    max_pool(jnp.ones((4, 1)), (2, 2))
  assert e.value.shapes == [(4, 1)]
