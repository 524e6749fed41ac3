"""Recurrent cells (`LSTMCell`, `OptimizedLSTMCell`, `GRUCell`, `SimpleCell`)
and the sequence layers `RNN` and `Bidirectional`.

A cell maps ``(carry, inputs) -> (new_carry, output)`` for one time step;
`initialize_carry` builds the starting carry for a given input shape. `RNN`
scans a cell over the time axis (the cell's state, e.g. its parameters and
any rng counts, is threaded through the scan); `Bidirectional` runs one RNN
forwards and one backwards and merges their outputs.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> cell = LSTMCell(3, 5, rngs=Rngs(0))
>>> carry = cell.initialize_carry((2, 3), Rngs(0))
>>> carry, y = cell(carry, jnp.ones((2, 3)))
>>> y.shape, carry[0].shape
((2, 5), (2, 5))
>>> RNN(cell)(jnp.ones((2, 7, 3))).shape
(2, 7, 5)
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._filters import All, to_predicate
from spmdnnx._graph import iter_graph, merge, split, update
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx.nn.activations import sigmoid, tanh
from spmdnnx.nn._linear import Linear
from spmdnnx._rngs import Rngs, RngStream
from spmdnnx._variables import RngState, unbox

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def modified_orthogonal(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
  """An orthogonal initializer computed in float32, then cast to `dtype`.

  The default recurrent initializer of every cell (Flax uses it for
  `LSTMCell`; for float32 it equals ``orthogonal()``): the QR decomposition
  runs in float32, so bfloat16/float16 cells can be created (XLA:CPU has no
  half-precision QR).

  >>> w = modified_orthogonal(jax.random.key(0), (3, 3), jnp.bfloat16)
  >>> w.dtype
  dtype(bfloat16)
  """
  return initializers.orthogonal()(key, shape, jnp.float32).astype(dtype)


def _carry_stream(cell: Any, rngs: Any) -> Any:
  """The stream carry initializers draw from: `rngs` (Rngs -> its ``carry``), or
  the cell's own (``keep_rngs=True``); None when there is none."""
  if rngs is None:
    rngs = getattr(cell, "rngs", None)
  if isinstance(rngs, Rngs):
    rngs = rngs.carry
  return rngs


def _carry_part(cell: Any, stream: Any, input_shape: tuple, carry_init: Callable | None):
  init = carry_init or cell.carry_init or initializers.zeros
  key = stream() if stream is not None else jax.random.key(0)
  shape = tuple(input_shape[:-1]) + (cell.hidden_features,)
  return unbox(init(key, shape, cell.param_dtype))


class RNNCellBase(Module):
  """The interface of recurrent cells (what `RNN` needs from a cell).

  A cell is called as ``cell(carry, inputs) -> (carry, output)``, builds its
  first carry with ``initialize_carry(input_shape, rngs=None, carry_init=None)``
  and says with ``num_feature_axes`` how many trailing input axes are features.

  >>> issubclass(LSTMCell, RNNCellBase), LSTMCell(2, 3, rngs=Rngs(0)).num_feature_axes
  (True, 1)
  """

  def initialize_carry(self, input_shape: tuple, rngs: Any = None,
                       carry_init: Callable | None = None) -> Any:
    raise NotImplementedError

  def __call__(self, carry: Any, inputs: jax.Array) -> tuple[Any, jax.Array]:
    raise NotImplementedError

  @property
  def num_feature_axes(self) -> int:
    return 1


class _Cell(RNNCellBase):
  """Shared configuration and input checks of the built-in cells."""

  def _setup(self, in_features: int, hidden_features: int, carry_init: Callable | None,
             dtype: Any, param_dtype: Any, promote_dtype: Callable, keep_rngs: bool,
             rngs: Rngs, **extra: Any) -> None:
    _common.check_positive(type(self).__name__, in_features=in_features,
                           hidden_features=hidden_features)
    _common.set_attrs(self, in_features=in_features, hidden_features=hidden_features,
                      carry_init=carry_init, dtype=dtype, param_dtype=param_dtype,
                      promote_dtype=promote_dtype,
                      rngs=rngs.carry.fork() if keep_rngs else None, **extra)

  def _dense(self, in_features: int, out_features: int, use_bias: bool,
             kernel_init: Callable, bias_init: Callable, kernel_axes: Any,
             kernel_metadata: Any, bias_metadata: Any, rngs: Rngs) -> Linear:
    return Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                  bias_init=bias_init, dtype=self.dtype, param_dtype=self.param_dtype,
                  promote_dtype=self.promote_dtype, kernel_axes=kernel_axes, rngs=rngs,
                  kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)

  def _check(self, inputs: jax.Array, h: jax.Array) -> None:
    _common.check_features(self, inputs, -1, self.in_features, "in features")
    _common.check_features(self, h, -1, self.hidden_features, "hidden features")


_CELL_ARGS = """    in_features: input width.
    hidden_features: width of the hidden state.
    kernel_init: initializer of the input projections.
    recurrent_kernel_init: initializer of the hidden projections.
    bias_init: initializer of the biases.
    dtype, param_dtype: compute and storage dtypes.
    carry_init: default initializer of the carry (None: zeros); prefer
      ``initialize_carry(..., carry_init=...)``.
    promote_dtype: passed to the inner `Linear` layers.
    keep_rngs: keep a fork of ``rngs.carry`` so `initialize_carry` needs none.
    kernel_axes, recurrent_kernel_axes: logical axes of the two kinds of kernel.
    rngs: random streams (``params`` for the kernels).
    kernel_metadata, recurrent_kernel_metadata, bias_metadata: extra Param
      metadata (Flax's spelling)."""


class LSTMCell(_Cell):
  """A long short-term memory cell; the carry is ``(c, h)``.

  Eight `Linear` projections: ``ii, if_, ig, io`` (input, no bias) and
  ``hi, hf, hg, ho`` (hidden, with bias), created in that order.

  Args:
    gate_fn: gate nonlinearity (sigmoid).
    activation_fn: candidate/output nonlinearity (tanh).
""" + _CELL_ARGS + """
  """

  def __init__(self, in_features: int, hidden_features: int, *,
               gate_fn: Callable = sigmoid, activation_fn: Callable = tanh,
               kernel_init: Callable = initializers.default_kernel_init(),
               recurrent_kernel_init: Callable = modified_orthogonal,
               bias_init: Callable = initializers.zeros, dtype: Any = None,
               param_dtype: Any = jnp.float32, carry_init: Callable | None = None,
               promote_dtype: Callable = _common.promote_dtypes, keep_rngs: bool = False,
               kernel_axes: Any = None, recurrent_kernel_axes: Any = None, rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    self._setup(in_features, hidden_features, carry_init, dtype, param_dtype,
                promote_dtype, keep_rngs, rngs, gate_fn=gate_fn,
                activation_fn=activation_fn)

    def dense_i():
      return self._dense(in_features, hidden_features, False, kernel_init, bias_init,
                         kernel_axes, kernel_metadata, _NO_METADATA, rngs)

    def dense_h():
      return self._dense(hidden_features, hidden_features, True, recurrent_kernel_init,
                         bias_init, recurrent_kernel_axes, recurrent_kernel_metadata,
                         bias_metadata, rngs)

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

  def initialize_carry(self, input_shape: tuple, rngs: Any = None,
                       carry_init: Callable | None = None) -> tuple:
    """The carry ``(c, h)`` for inputs of shape ``(*batch, in_features)``.

    ``rngs`` (an `Rngs`, whose ``carry`` stream is used, or a stream) keys the
    ``carry_init`` draws (default zeros: the keys do not matter).
    """
    stream = _carry_stream(self, rngs)
    c = _carry_part(self, stream, input_shape, carry_init)
    return c, _carry_part(self, stream, input_shape, carry_init)


class OptimizedLSTMCell(_Cell):
  """An LSTM cell computing its four gates with two fused projections.

  Same maths as `LSTMCell`, with the input projections fused into ``dense_i``
  (in, 4 * hidden; no bias) and the hidden ones into ``dense_h`` (hidden,
  4 * hidden; with bias): fewer, larger matmuls.

  Args:
    gate_fn, activation_fn: as `LSTMCell`.
""" + _CELL_ARGS + """

  >>> from spmdnnx._rngs import Rngs
  >>> cell = OptimizedLSTMCell(3, 4, rngs=Rngs(0))
  >>> (c, h), y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
  >>> cell.dense_h.kernel.shape, y.shape
  ((4, 16), (2, 4))
  """

  def __init__(self, in_features: int, hidden_features: int, *,
               gate_fn: Callable = sigmoid, activation_fn: Callable = tanh,
               kernel_init: Callable = initializers.default_kernel_init(),
               recurrent_kernel_init: Callable = modified_orthogonal,
               bias_init: Callable = initializers.zeros, dtype: Any = None,
               param_dtype: Any = jnp.float32, carry_init: Callable | None = None,
               promote_dtype: Callable = _common.promote_dtypes, keep_rngs: bool = False,
               kernel_axes: Any = None, recurrent_kernel_axes: Any = None, rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    self._setup(in_features, hidden_features, carry_init, dtype, param_dtype,
                promote_dtype, keep_rngs, rngs, gate_fn=gate_fn,
                activation_fn=activation_fn)
    self.dense_i = self._dense(in_features, 4 * hidden_features, False, kernel_init,
                               bias_init, kernel_axes, kernel_metadata, _NO_METADATA, rngs)
    self.dense_h = self._dense(hidden_features, 4 * hidden_features, True,
                               recurrent_kernel_init, bias_init, recurrent_kernel_axes,
                               recurrent_kernel_metadata, bias_metadata, rngs)

  def __call__(self, carry: tuple, inputs: jax.Array) -> tuple[tuple, jax.Array]:
    c, h = carry
    self._check(inputs, h)
    i, f, g, o = jnp.split(self.dense_i(inputs) + self.dense_h(h), 4, axis=-1)
    i, f, g, o = self.gate_fn(i), self.gate_fn(f), self.activation_fn(g), self.gate_fn(o)
    new_c = f * c.astype(f.dtype) + i * g
    new_h = o * self.activation_fn(new_c)
    return (new_c, new_h), new_h

  initialize_carry = LSTMCell.initialize_carry


class GRUCell(_Cell):
  """A gated recurrent unit cell; the carry is the hidden state ``h``.

  ``r = gate(W_ir x + b_ir + W_hr h)``, ``z = gate(W_iz x + b_iz + W_hz h)``,
  ``n = act(W_in x + b_in + r * W_hn h)``, ``h' = (1 - z) * n + z * h``; the
  three input projections share one kernel ``dense_i`` (in, 3*hidden) and the
  hidden ones ``dense_h`` (hidden, 3*hidden).

  Args:
    gate_fn, activation_fn: as `LSTMCell`.
""" + _CELL_ARGS + """

  >>> from spmdnnx._rngs import Rngs
  >>> cell = GRUCell(3, 4, rngs=Rngs(0))
  >>> h, y = cell(cell.initialize_carry((3,)), jnp.ones(3))
  >>> h.shape
  (4,)
  """

  def __init__(self, in_features: int, hidden_features: int, *,
               gate_fn: Callable = sigmoid, activation_fn: Callable = tanh,
               kernel_init: Callable = initializers.default_kernel_init(),
               recurrent_kernel_init: Callable = modified_orthogonal,
               bias_init: Callable = initializers.zeros, dtype: Any = None,
               param_dtype: Any = jnp.float32, carry_init: Callable | None = None,
               promote_dtype: Callable = _common.promote_dtypes, keep_rngs: bool = False,
               kernel_axes: Any = None, recurrent_kernel_axes: Any = None, rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    self._setup(in_features, hidden_features, carry_init, dtype, param_dtype,
                promote_dtype, keep_rngs, rngs, gate_fn=gate_fn,
                activation_fn=activation_fn)
    self.dense_i = self._dense(in_features, 3 * hidden_features, True, kernel_init,
                               bias_init, kernel_axes, kernel_metadata, bias_metadata, rngs)
    self.dense_h = self._dense(hidden_features, 3 * hidden_features, False,
                               recurrent_kernel_init, bias_init, recurrent_kernel_axes,
                               recurrent_kernel_metadata, _NO_METADATA, rngs)

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

  def initialize_carry(self, input_shape: tuple, rngs: Any = None,
                       carry_init: Callable | None = None) -> jax.Array:
    """The hidden state for inputs of shape ``(*batch, in_features)`` (see `LSTMCell`)."""
    return _carry_part(self, _carry_stream(self, rngs), input_shape, carry_init)


class SimpleCell(_Cell):
  """An Elman cell: ``h' = act(W_i x + b + W_h h (+ h if residual))``.

  ``dense_h`` (hidden, hidden; no bias) is created before ``dense_i`` (in,
  hidden; with bias), as in Flax, so the same seed gives the same weights.

  Args:
    residual: add the previous hidden state before the activation.
    activation_fn: the nonlinearity (tanh).
""" + _CELL_ARGS + """

  >>> from spmdnnx._rngs import Rngs
  >>> cell = SimpleCell(3, 4, rngs=Rngs(0))
  >>> h, y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
  >>> h.shape
  (2, 4)
  """

  def __init__(self, in_features: int, hidden_features: int, *,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               carry_init: Callable | None = None, residual: bool = False,
               activation_fn: Callable = tanh,
               kernel_init: Callable = initializers.lecun_normal(),
               recurrent_kernel_init: Callable = modified_orthogonal,
               bias_init: Callable = initializers.zeros,
               promote_dtype: Callable = _common.promote_dtypes, keep_rngs: bool = False,
               kernel_axes: Any = None, recurrent_kernel_axes: Any = None, rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    self._setup(in_features, hidden_features, carry_init, dtype, param_dtype,
                promote_dtype, keep_rngs, rngs, residual=residual,
                activation_fn=activation_fn)
    self.dense_h = self._dense(hidden_features, hidden_features, False,
                               recurrent_kernel_init, bias_init, recurrent_kernel_axes,
                               recurrent_kernel_metadata, _NO_METADATA, rngs)
    self.dense_i = self._dense(in_features, hidden_features, True, kernel_init, bias_init,
                               kernel_axes, kernel_metadata, bias_metadata, rngs)

  def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    self._check(inputs, carry)
    new = self.dense_i(inputs) + self.dense_h(carry)
    if self.residual:
      new = new + carry.astype(new.dtype)
    new = self.activation_fn(new)
    return new, new

  initialize_carry = GRUCell.initialize_carry


def flip_sequences(inputs: jax.Array, seq_lengths: jax.Array | None, num_batch_dims: int,
                   time_major: bool) -> jax.Array:
  """Reverses each sequence along the time axis, keeping padding at the end.

  With ``seq_lengths`` (one per batch entry), entry ``b`` has its first
  ``seq_lengths[b]`` steps reversed in place; the padding steps after them
  stay after them (reversed among themselves).

  >>> x = jnp.array([[1, 2, 3, 0], [1, 2, 3, 4]])
  >>> flip_sequences(x, jnp.array([3, 4]), num_batch_dims=1, time_major=False)
  Array([[3, 2, 1, 0],
         [4, 3, 2, 1]], dtype=int32)
  """
  time_axis = 0 if time_major else num_batch_dims
  steps = inputs.shape[time_axis]
  if seq_lengths is None:
    return jnp.flip(inputs, axis=time_axis)
  t = jnp.arange(steps)
  lengths = jnp.expand_dims(jnp.asarray(seq_lengths), time_axis)
  if time_major:
    t = t.reshape((steps,) + (1,) * num_batch_dims)
  else:
    t = t.reshape((1,) * num_batch_dims + (steps,))
  # step t of the output is step (length - 1 - t) mod steps of the input
  index = (lengths - 1 - t) % steps
  index = index.reshape(index.shape + (1,) * (inputs.ndim - index.ndim))
  return jnp.take_along_axis(inputs, index, axis=time_axis)


def _stream_of(rngs: Any) -> Any:
  """`RNN`/`Bidirectional`'s own carry stream from their ``rngs`` argument."""
  if rngs is True:
    return RngStream(0, tag="carry")
  if rngs is False or rngs is None:
    return None
  if isinstance(rngs, Rngs):
    return rngs.carry.fork()
  if isinstance(rngs, RngStream):
    return rngs
  raise errors.ConfigError(
      f"rngs must be an Rngs, an RngStream or a bool, got {type(rngs).__name__}; "
      "pass rngs=True (a default carry stream) or nnx.Rngs(...).", value=repr(rngs))


def _broadcast_streams(cell: Module, bcast: Any) -> list:
  """Reseeds the cell's rng streams matched by `bcast` for one scan.

  Each matched stream draws one key (its count advances by one, as for any
  use), and holds that key with a zero count while the scan runs, so every
  step draws the same keys. Returns ``(stream, key, count)`` to restore.
  """
  saved = []
  for path, obj in iter_graph(cell):
    if isinstance(obj, RngStream) and bcast(path + ("key",), obj.key):
      key = obj()
      saved.append((obj, obj.key.value, obj.count.value))
      obj.key.value = key
      obj.count.value = jnp.zeros_like(obj.count.value)
  return saved


def _scan_cell(cell: Module, carry: Any, xs: jax.Array, *, unroll: int,
               broadcast_rngs: Any, keep_carries: bool) -> tuple:
  """Runs ``cell`` over axis 0 of ``xs``; returns (carry, outputs, carries or None).

  The cell's state goes through the scan as part of the carry (so rng counts
  and other updates persist), except the rng streams matched by
  ``broadcast_rngs``: every step sees them in the same state (the same keys
  each step, e.g. one recurrent-dropout mask per sequence), and each call
  advances them by one draw.
  """
  bcast = None
  saved = []
  if broadcast_rngs is not None:
    bcast = to_predicate(All(RngState, broadcast_rngs))
    saved = _broadcast_streams(cell, bcast)
  try:
    if bcast is None:
      graphdef, state = split(cell)
      fixed = None
    else:
      graphdef, fixed, state = split(cell, bcast, ...)

    def step(loop, x):
      carry, state = loop
      parts = (state,) if fixed is None else (fixed, state)
      step_cell = merge(graphdef, *parts)
      carry, y = step_cell(carry, x)
      if fixed is None:
        _, new_state = split(step_cell)
      else:
        _, _, new_state = split(step_cell, bcast, ...)
      return (carry, new_state), (y, carry if keep_carries else None)

    (carry, state), (ys, carries) = jax.lax.scan(step, (carry, state), xs, unroll=unroll)
    update(cell, state)
  finally:
    for stream, key, count in saved:
      stream.key.value, stream.count.value = key, count
  return carry, ys, carries


class RNN(Module):
  """Scans a recurrent cell over the time axis of its inputs.

  Args:
    cell: the cell (any `RNNCellBase`-like Module).
    time_major: inputs are ``(time, *batch, features)`` instead of
      ``(*batch, time, features)``.
    return_carry: also return the final carry: ``(carry, outputs)``.
    reverse: run from the last step to the first (padding, given
      ``seq_lengths``, stays at the end).
    keep_order: with ``reverse``, return the outputs in input order.
    unroll: steps unrolled per loop iteration.
    state_axes: accepted for Flax compatibility (the cell's state is carried).
    broadcast_rngs: a filter of the cell's rng streams whose keys stay the
      same at every step (e.g. recurrent dropout); each call draws them once.
    rngs: the stream used for default initial carries: True (a fixed stream),
      False, an `Rngs` (its ``carry`` stream is forked) or an `RngStream`.

  Call arguments ``initial_carry``, ``seq_lengths`` (the final carry is then
  each sequence's carry at its last valid step), ``return_carry``,
  ``time_major``, ``reverse``, ``keep_order`` and ``rngs`` override the above.

  >>> from spmdnnx._rngs import Rngs
  >>> rnn = RNN(GRUCell(2, 3, rngs=Rngs(0)), return_carry=True)
  >>> h, ys = rnn(jnp.ones((4, 5, 2)))
  >>> h.shape, ys.shape
  ((4, 3), (4, 5, 3))
  """

  def __init__(self, cell: Module, *, time_major: bool = False, return_carry: bool = False,
               reverse: bool = False, keep_order: bool = False, unroll: int = 1,
               state_axes: Any = None, broadcast_rngs: Any = None, rngs: Any = True):
    _common.set_attrs(self, cell=cell, time_major=time_major, return_carry=return_carry,
                      reverse=reverse, keep_order=keep_order, unroll=unroll,
                      state_axes=state_axes, broadcast_rngs=broadcast_rngs,
                      rngs=_stream_of(rngs))
    if broadcast_rngs is not None:
      to_predicate(broadcast_rngs)  # FilterError now rather than at the first call

  def __call__(self, inputs: jax.Array, *, initial_carry: Any = None,
               seq_lengths: jax.Array | None = None, return_carry: bool | None = None,
               time_major: bool | None = None, reverse: bool | None = None,
               keep_order: bool | None = None, rngs: Any = None) -> Any:
    return_carry = self.return_carry if return_carry is None else return_carry
    time_major = self.time_major if time_major is None else time_major
    reverse = self.reverse if reverse is None else reverse
    keep_order = self.keep_order if keep_order is None else keep_order
    n_features = self.cell.num_feature_axes
    if inputs.ndim < n_features + 1:
      raise errors.ShapeError(
          f"RNN: inputs of shape {tuple(inputs.shape)} have no time axis; expected "
          f"(*batch, time, {n_features} feature axes) (or time first with "
          "time_major=True).", shapes=[tuple(inputs.shape)])
    time_axis = 0 if time_major else inputs.ndim - n_features - 1
    n_batch = inputs.ndim - n_features - 1
    if reverse:
      inputs = flip_sequences(inputs, seq_lengths, n_batch, time_major)
    if initial_carry is None:
      stream = self.rngs if rngs is None else rngs
      if isinstance(stream, Rngs):
        stream = stream.carry.fork()
      step_shape = inputs.shape[:time_axis] + inputs.shape[time_axis + 1:]
      initial_carry = self.cell.initialize_carry(step_shape, stream)
    keep_carries = seq_lengths is not None and return_carry
    xs = jnp.moveaxis(inputs, time_axis, 0)
    carry, ys, carries = _scan_cell(self.cell, initial_carry, xs, unroll=self.unroll,
                                    broadcast_rngs=self.broadcast_rngs,
                                    keep_carries=keep_carries)
    outputs = jnp.moveaxis(ys, 0, time_axis)
    if keep_carries:
      last = jnp.asarray(seq_lengths) - 1
      carry = jax.tree.map(lambda c: c[last, jnp.arange(c.shape[1])], carries)
    if reverse and keep_order:
      outputs = flip_sequences(outputs, seq_lengths, n_batch, time_major)
    return (carry, outputs) if return_carry else outputs


def _concatenate(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.concatenate([a, b], axis=-1)


class Bidirectional(Module):
  """Runs one RNN forwards and another backwards and merges their outputs.

  Args:
    forward_rnn, backward_rnn: the two `RNN`s (the backward one is called with
      ``reverse=True, keep_order=True``).
    merge_fn: combines the two outputs (default: concatenate features).
    time_major, return_carry: as `RNN` (the carry is ``(forward, backward)``).
    rngs: as `RNN`.

  >>> from spmdnnx._rngs import Rngs
  >>> bi = Bidirectional(RNN(GRUCell(2, 3, rngs=Rngs(0))), RNN(GRUCell(2, 3, rngs=Rngs(1))))
  >>> bi(jnp.ones((4, 5, 2))).shape
  (4, 5, 6)
  """

  def __init__(self, forward_rnn: Module, backward_rnn: Module, *,
               merge_fn: Callable = _concatenate, time_major: bool = False,
               return_carry: bool = False, rngs: Any = True):
    _common.set_attrs(self, forward_rnn=forward_rnn, backward_rnn=backward_rnn,
                      merge_fn=merge_fn, time_major=time_major, return_carry=return_carry,
                      rngs=_stream_of(rngs))

  def __call__(self, inputs: jax.Array, *, initial_carry: tuple | None = None,
               rngs: Any = None, seq_lengths: jax.Array | None = None,
               return_carry: bool | None = None, time_major: bool | None = None,
               reverse: bool | None = None, keep_order: bool | None = None) -> Any:
    del reverse, keep_order  # fixed by the direction of each RNN
    time_major = self.time_major if time_major is None else time_major
    return_carry = self.return_carry if return_carry is None else return_carry
    rngs = self.rngs if rngs is None else rngs
    if isinstance(rngs, Rngs):
      rngs = rngs.carry
    forward, backward = initial_carry if initial_carry is not None else (None, None)
    carry_f, out_f = self.forward_rnn(inputs, initial_carry=forward, rngs=rngs,
                                      seq_lengths=seq_lengths, return_carry=True,
                                      time_major=time_major, reverse=False)
    carry_b, out_b = self.backward_rnn(inputs, initial_carry=backward, rngs=rngs,
                                       seq_lengths=seq_lengths, return_carry=True,
                                       time_major=time_major, reverse=True,
                                       keep_order=True)
    outputs = jax.tree.map(self.merge_fn, out_f, out_b)
    return ((carry_f, carry_b), outputs) if return_carry else outputs
