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


# --- RNN, Bidirectional, OptimizedLSTMCell, SimpleCell ------------------------

from spmdnnx.nn import (RNN, Bidirectional, OptimizedLSTMCell, SimpleCell,  # noqa: E402
                        flip_sequences)


def _loop(cell, carry, xs):
  ys = []
  for t in range(xs.shape[1]):
    carry, y = cell(carry, xs[:, t])
    ys.append(y)
  return carry, jnp.stack(ys, 1)


def test_optimized_lstm_equals_lstm_with_the_same_weights():
  lstm = nnx.LSTMCell(3, 4, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  fast = OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(1))
  gates = ("i", "f", "g", "o")
  ins = [lstm.ii, lstm.if_, lstm.ig, lstm.io]
  hids = [lstm.hi, lstm.hf, lstm.hg, lstm.ho]
  fast.dense_i.kernel.value = jnp.concatenate([m.kernel.value for m in ins], -1)
  fast.dense_h.kernel.value = jnp.concatenate([m.kernel.value for m in hids], -1)
  fast.dense_h.bias.value = jnp.concatenate([m.bias.value for m in hids], -1)
  assert len(gates) == 4
  x = jax.random.normal(jax.random.key(0), (2, 3))
  carry = lstm.initialize_carry((2, 3), nnx.Rngs(0), carry_init=nnx.initializers.normal(1.0))
  (c1, h1), y1 = lstm(carry, x)
  (c2, h2), y2 = fast(carry, x)
  close(c1, c2, 1e-5)
  close(y1, y2, 1e-5)


def test_simple_cell_and_carry_init():
  cell = SimpleCell(3, 2, residual=True, bias_init=nnx.initializers.normal(1.0),
                    rngs=nnx.Rngs(0))
  h = cell.initialize_carry((4, 3), nnx.Rngs(1), carry_init=nnx.initializers.ones)
  close(h, np.ones((4, 2)))
  x = jax.random.normal(jax.random.key(0), (4, 3))
  new, y = cell(h, x)
  ref = np.tanh(np.asarray(x) @ np.asarray(cell.dense_i.kernel.value)
                + np.asarray(cell.dense_i.bias.value)
                + np.asarray(h) @ np.asarray(cell.dense_h.kernel.value) + np.asarray(h))
  close(new, ref, 1e-5)
  # Flax's creation order: dense_h draws its key before dense_i
  keys = nnx.Rngs(0)
  k_h = keys.params()
  close(cell.dense_h.kernel.value, nnx.initializers.orthogonal()(k_h, (2, 2)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cells_run_in_half_precision(dtype):
  for make in (nnx.LSTMCell, OptimizedLSTMCell, nnx.GRUCell, SimpleCell):
    cell = make(3, 4, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    ys = RNN(cell)(jnp.ones((2, 5, 3), dtype))
    assert ys.dtype == dtype and ys.shape == (2, 5, 4), make.__name__
    assert bool(jnp.all(jnp.isfinite(ys.astype(jnp.float32))))


def test_rnn_matches_a_python_loop_and_returns_the_carry():
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
  carry, ys = RNN(cell, return_carry=True)(xs)
  ref_carry, ref_ys = _loop(cell, cell.initialize_carry((2, 3)), xs)
  close(ys, ref_ys, 1e-5)
  close(carry, ref_carry, 1e-5)
  tm = RNN(cell, time_major=True)(jnp.swapaxes(xs, 0, 1))
  close(jnp.swapaxes(tm, 0, 1), ref_ys, 1e-5)


def test_rnn_reverse_with_seq_lengths_keeps_padding_at_the_end():
  cell = nnx.GRUCell(1, 2, rngs=nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(1), (2, 4, 1))
  lengths = jnp.array([2, 4])
  rnn = RNN(cell, reverse=True, keep_order=True, return_carry=True)
  carry, ys = rnn(xs, seq_lengths=lengths)
  # sequence 0 is [x0, x1]: processed x1 then x0; its output at step 0 is the last one
  h = cell.initialize_carry((1,))
  h, y1 = cell(h, xs[0, 1])
  h, y0 = cell(h, xs[0, 0])
  close(ys[0, 0], y0, 1e-5)
  close(ys[0, 1], y1, 1e-5)
  close(carry[0], h, 1e-5)  # the carry after the last valid step
  flipped = flip_sequences(jnp.arange(8).reshape(2, 4), lengths, 1, False)
  np.testing.assert_array_equal(flipped, [[1, 0, 3, 2], [7, 6, 5, 4]])


def test_bidirectional_concatenates_forward_and_backward():
  fwd, bwd = RNN(nnx.GRUCell(2, 3, rngs=nnx.Rngs(0))), RNN(nnx.GRUCell(2, 3, rngs=nnx.Rngs(1)))
  xs = jax.random.normal(jax.random.key(2), (1, 4, 2))
  bi = Bidirectional(fwd, bwd, return_carry=True)
  (cf, cb), ys = bi(xs)
  close(ys[..., :3], fwd(xs), 1e-5)
  close(ys[..., 3:], bwd(xs, reverse=True, keep_order=True), 1e-5)
  close(cb, bwd(xs, reverse=True, return_carry=True)[0], 1e-5)


def test_rnn_broadcast_rngs_reuse_one_key_per_call():
  class DropCell(nnx.GRUCell):
    def __init__(self, rngs):
      super().__init__(2, 8, rngs=rngs)
      self.drop = nnx.Dropout(0.5, deterministic=False, rng_collection="rd", rngs=rngs)

    def __call__(self, carry, x):
      carry, y = super().__call__(carry, x)
      return carry, self.drop(jnp.ones_like(y))

  cell = DropCell(nnx.Rngs(0, rd=1))
  masks = RNN(cell, broadcast_rngs="rd")(jnp.ones((1, 6, 2)))
  # the same dropout mask at every step, and one draw per call
  np.testing.assert_array_equal(masks[0], np.broadcast_to(masks[0, :1], (6, 8)))
  assert int(cell.drop.rngs.count.value) == 1
  other = RNN(cell, broadcast_rngs="rd")(jnp.ones((1, 6, 2)))
  assert int(cell.drop.rngs.count.value) == 2 and not np.array_equal(other, masks)
  per_step = RNN(cell)(jnp.ones((1, 6, 2)))   # not broadcast: a new mask per step
  assert not np.array_equal(per_step[0, 0], per_step[0, 1])
  assert int(cell.drop.rngs.count.value) == 8


def test_rnn_errors():
  with pytest.raises(errors.ConfigError, match="rngs must be an Rngs, an RngStream or a bool"):
    RNN(nnx.GRUCell(2, 3, rngs=nnx.Rngs(0)), rngs="seed")
  with pytest.raises(errors.ShapeError, match=r"RNN: inputs of shape \(3,\) have no time axis"):
    RNN(nnx.GRUCell(2, 3, rngs=nnx.Rngs(0)))(jnp.ones(3))
