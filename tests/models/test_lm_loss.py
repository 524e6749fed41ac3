"""lm_loss against a numpy reference: mask, z-loss, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmdnnx import errors
from spmdnnx import models


def _reference(logits, targets, mask, z_loss):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.ones(targets.shape) if mask is None else np.asarray(mask, np.float64)
  denom = max(w.sum(), 1.0)
  nll = ((lse - picked) * w).sum() / denom
  z = z_loss * (lse ** 2 * w).sum() / denom
  return nll + z, nll, z


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_numpy_reference(use_mask, z_loss):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = 3.0 * jax.random.normal(k1, (3, 5, 7))
  targets = jax.random.randint(k2, (3, 5), 0, 7)
  mask = jax.random.bernoulli(k3, 0.6, (3, 5)) if use_mask else None
  loss, aux = models.lm_loss(logits, targets, mask, z_loss=z_loss)
  want, nll, z = _reference(logits, targets, mask, z_loss)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["nll"], nll, rtol=1e-5)
  np.testing.assert_allclose(aux["z_loss"], z, rtol=1e-5, atol=1e-7)
  assert loss.dtype == aux["nll"].dtype == aux["z_loss"].dtype == jnp.float32
  assert loss.shape == ()


def test_masked_positions_do_not_count():
  logits = jax.random.normal(jax.random.key(1), (2, 4, 6))
  targets = jnp.zeros((2, 4), jnp.int32)
  mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
  garbage = logits.at[:, 2:].set(100.0).at[1, 1:].set(-50.0)
  np.testing.assert_allclose(models.lm_loss(logits, targets, mask)[0],
                             models.lm_loss(garbage, targets, mask)[0], rtol=1e-6)
  # An all-zero mask gives zero, not NaN.
  assert float(models.lm_loss(logits, targets, jnp.zeros((2, 4)))[0]) == 0.0


def test_bfloat16_logits_are_computed_in_float32():
  logits = jax.random.normal(jax.random.key(2), (2, 3, 5))
  targets = jnp.array([[0, 1, 2], [3, 4, 0]])
  loss_bf16, _ = models.lm_loss(logits.astype(jnp.bfloat16), targets)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(loss_bf16, models.lm_loss(logits, targets)[0], rtol=1e-2)


def test_errors():
  logits = jnp.zeros((2, 3, 5))
  with pytest.raises(errors.ShapeError, match=r"logits \[2, 3, 5\] needs targets \[2, 3\], "
                     r"got \[2, 4\]"):
    models.lm_loss(logits, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(errors.ShapeError, match="targets must be integer token ids, got float32"):
    models.lm_loss(logits, jnp.zeros((2, 3)))
  with pytest.raises(errors.ShapeError, match=r"mask must have the targets' shape \[2, 3\], "
                     r"got \[2\]"):
    models.lm_loss(logits, jnp.zeros((2, 3), jnp.int32), jnp.ones(2))
