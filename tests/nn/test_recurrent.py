"""LSTMCell and GRUCell against hand-written numpy steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply, param_grads

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import GRUCell, LSTMCell, initializers


def _sig(x):
  return 1 / (1 + np.exp(-x))


def _lin(layer, x):
  y = x @ np.asarray(layer.kernel.value)
  return y + np.asarray(layer.bias.value) if layer.bias is not None else y


def test_lstm_step_matches_reference_and_scans():
  cell = LSTMCell(3, 4, bias_init=initializers.normal(0.5), rngs=nnx.Rngs(0))
  c, h = cell.initialize_carry((2, 3))
  assert c.shape == h.shape == (2, 4)
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3)))
  c0 = np.asarray(jax.random.normal(jax.random.key(2), (2, 4)))
  h0 = np.asarray(jax.random.normal(jax.random.key(3), (2, 4)))
  (c1, h1), y = cell((jnp.asarray(c0), jnp.asarray(h0)), jnp.asarray(x))
  i = _sig(_lin(cell.ii, x) + _lin(cell.hi, h0))
  f = _sig(_lin(cell.if_, x) + _lin(cell.hf, h0))
  g = np.tanh(_lin(cell.ig, x) + _lin(cell.hg, h0))
  o = _sig(_lin(cell.io, x) + _lin(cell.ho, h0))
  rc = f * c0 + i * g
  close(c1, rc, 1e-5)
  close(h1, o * np.tanh(rc), 1e-5)
  close(y, h1)

  xs = jnp.ones((5, 2, 3))

  def run(m, xs):
    return jax.lax.scan(lambda carry, xt: m(carry, xt), m.initialize_carry((2, 3)), xs)[1]

  assert jit_apply(cell, run, xs).shape == (5, 2, 4)
  grads = param_grads(cell, lambda m: jnp.sum(run(m, xs)))
  assert float(jnp.abs(grads["hi"]["kernel"].value).sum()) > 0


def test_gru_step_matches_reference():
  cell = GRUCell(3, 2, bias_init=initializers.normal(0.5), rngs=nnx.Rngs(0))
  assert cell.dense_i.kernel.shape == (3, 6) and cell.dense_h.bias is None
  x = np.asarray(jax.random.normal(jax.random.key(1), (4, 3)))
  h0 = np.asarray(jax.random.normal(jax.random.key(2), (4, 2)))
  h1, y = cell(jnp.asarray(h0), jnp.asarray(x))
  xr, xz, xn = np.split(_lin(cell.dense_i, x), 3, -1)
  hr, hz, hn = np.split(_lin(cell.dense_h, h0), 3, -1)
  r, z = _sig(xr + hr), _sig(xz + hz)
  n = np.tanh(xn + r * hn)
  close(h1, (1 - z) * n + z * h0, 1e-5)
  assert cell.initialize_carry((7, 3)).shape == (7, 2)


def test_recurrent_dtypes_and_errors():
  cell = LSTMCell(3, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  carry = cell.initialize_carry((1, 3))
  (c, h), _ = cell(carry, jnp.ones((1, 3), jnp.bfloat16))
  assert h.dtype == jnp.bfloat16
  with pytest.raises(errors.ConfigError, match=r"GRUCell: hidden_features must be a positive int"):
    GRUCell(3, 0, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match=r"LSTMCell: expected an input whose axis -1 has 3 in features"):
    cell(carry, jnp.ones((1, 2)))
