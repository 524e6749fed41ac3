"""Recurrent cells: `LSTMCell` and `GRUCell`.

A cell maps ``(carry, inputs) -> (new_carry, output)`` for one time step;
`initialize_carry` builds the starting carry for a given input shape. Loop
over time with ``jax.lax.scan`` (or the lifted ``nnx.scan``).

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> cell = LSTMCell(3, 5, rngs=Rngs(0))
>>> carry = cell.initialize_carry((2, 3))
>>> carry, y = cell(carry, jnp.ones((2, 3)))
>>> y.shape, carry[0].shape
((2, 5), (2, 5))
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx.nn.activations import sigmoid, tanh
from spmdnnx.nn._linear import Linear
from spmdnnx._rngs import Rngs


def _carry(cell: Any, input_shape: tuple, rngs: Rngs | None) -> jax.Array:
  key = rngs.carry() if rngs is not None else jax.random.key(0)
  shape = tuple(input_shape[:-1]) + (cell.hidden_features,)
  return cell.carry_init(key, shape, cell.param_dtype)


class _Cell(Module):
  """Shared construction of the input->hidden and hidden->hidden projections."""

  def _setup(self, in_features: int, hidden_features: int, gate_fn: Callable,
             activation_fn: Callable, carry_init: Callable, dtype: Any,
             param_dtype: Any) -> None:
    _common.check_positive(type(self).__name__, in_features=in_features,
                           hidden_features=hidden_features)
    _common.set_attrs(self, in_features=in_features, hidden_features=hidden_features,
                      gate_fn=gate_fn, activation_fn=activation_fn,
                      carry_init=carry_init, dtype=dtype, param_dtype=param_dtype)

  def _check(self, inputs: jax.Array, h: jax.Array) -> None:
    _common.check_features(self, inputs, -1, self.in_features, "in features")
    _common.check_features(self, h, -1, self.hidden_features, "hidden features")

  @property
  def num_feature_axes(self) -> int:
    return 1


class LSTMCell(_Cell):
  """A long short-term memory cell; the carry is ``(c, h)``.

  Args:
    in_features: input width.
    hidden_features: width of the cell and hidden state.
    gate_fn: gate nonlinearity (sigmoid).
    activation_fn: candidate/output nonlinearity (tanh).
    kernel_init: initializer of the input projections (no bias).
    recurrent_kernel_init: initializer of the hidden projections (orthogonal).
    bias_init: initializer of the hidden projections' biases.
    dtype, param_dtype: compute and storage dtypes.
    carry_init: initializer of the carry (zeros).
    kernel_axes, recurrent_kernel_axes: logical axes of the two kinds of kernel.
    rngs: random streams.
  """

  def __init__(self, in_features: int, hidden_features: int, *,
               gate_fn: Callable = sigmoid, activation_fn: Callable = tanh,
               kernel_init: Callable = initializers.default_kernel_init(),
               recurrent_kernel_init: Callable = initializers.orthogonal(),
               bias_init: Callable = initializers.zeros, dtype: Any = None,
               param_dtype: Any = jnp.float32, carry_init: Callable = initializers.zeros,
               kernel_axes: Any = None, recurrent_kernel_axes: Any = None, rngs: Rngs):
    self._setup(in_features, hidden_features, gate_fn, activation_fn, carry_init,
                dtype, param_dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def dense_i():
      return Linear(in_features, hidden_features, use_bias=False, kernel_init=kernel_init,
                    kernel_axes=kernel_axes, **common)

    def dense_h():
      return Linear(hidden_features, hidden_features, use_bias=True,
                    kernel_init=recurrent_kernel_init, bias_init=bias_init,
                    kernel_axes=recurrent_kernel_axes, **common)

    self.ii, self.if_, self.ig, self.io = dense_i(), dense_i(), dense_i(), dense_i()
    self.hi, self.hf, self.hg, self.ho = dense_h(), dense_h(), dense_h(), dense_h()

  def __call__(self, carry: tuple, inputs: jax.Array) -> tuple[tuple, jax.Array]:
    c, h = carry
    self._check(inputs, h)
    i = self.gate_fn(self.ii(inputs) + self.hi(h))
    f = self.gate_fn(self.if_(inputs) + self.hf(h))
    g = self.activation_fn(self.ig(inputs) + self.hg(h))
    o = self.gate_fn(self.io(inputs) + self.ho(h))
    new_c = f * c.astype(f.dtype) + i * g
    new_h = o * self.activation_fn(new_c)
    return (new_c, new_h), new_h

  def initialize_carry(self, input_shape: tuple, rngs: Rngs | None = None) -> tuple:
    """The zero carry ``(c, h)`` for inputs of shape ``(*batch, in_features)``."""
    return _carry(self, input_shape, rngs), _carry(self, input_shape, rngs)


class GRUCell(_Cell):
  """A gated recurrent unit cell; the carry is the hidden state ``h``.

  ``r = gate(W_ir x + b_ir + W_hr h)``, ``z = gate(W_iz x + b_iz + W_hz h)``,
  ``n = act(W_in x + b_in + r * W_hn h)``, ``h' = (1 - z) * n + z * h``; the
  three input projections share one kernel ``dense_i`` (in, 3*hidden) and the
  hidden ones ``dense_h`` (hidden, 3*hidden).

  Args: as `LSTMCell`.

  >>> from spmdnnx._rngs import Rngs
  >>> cell = GRUCell(3, 4, rngs=Rngs(0))
  >>> h, y = cell(cell.initialize_carry((3,)), jnp.ones(3))
  >>> h.shape
  (4,)
  """

  def __init__(self, in_features: int, hidden_features: int, *,
               gate_fn: Callable = sigmoid, activation_fn: Callable = tanh,
               kernel_init: Callable = initializers.default_kernel_init(),
               recurrent_kernel_init: Callable = initializers.orthogonal(),
               bias_init: Callable = initializers.zeros, dtype: Any = None,
               param_dtype: Any = jnp.float32, carry_init: Callable = initializers.zeros,
               kernel_axes: Any = None, recurrent_kernel_axes: Any = None, rngs: Rngs):
    self._setup(in_features, hidden_features, gate_fn, activation_fn, carry_init,
                dtype, param_dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense_i = Linear(in_features, 3 * hidden_features, use_bias=True,
                          kernel_init=kernel_init, bias_init=bias_init,
                          kernel_axes=kernel_axes, **common)
    self.dense_h = Linear(hidden_features, 3 * hidden_features, use_bias=False,
                          kernel_init=recurrent_kernel_init,
                          kernel_axes=recurrent_kernel_axes, **common)

  def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = carry
    self._check(inputs, h)
    xr, xz, xn = jnp.split(self.dense_i(inputs), 3, axis=-1)
    hr, hz, hn = jnp.split(self.dense_h(h), 3, axis=-1)
    r = self.gate_fn(xr + hr)
    z = self.gate_fn(xz + hz)
    n = self.activation_fn(xn + r * hn)
    new_h = (1.0 - z) * n + z * h.astype(z.dtype)
    return new_h, new_h

  def initialize_carry(self, input_shape: tuple, rngs: Rngs | None = None) -> jax.Array:
    """The zero hidden state for inputs of shape ``(*batch, in_features)``."""
    return _carry(self, input_shape, rngs)
