"""Dense layers: `Linear`, `LinearGeneral` and `Einsum`.

These are generic layers, so their parameters are unannotated unless the user
names the axes (``kernel_axes=("embed", "mlp")``, or Flax's
``kernel_init=nnx.with_partitioning(init, ("embed", "mlp"))``). The bias takes
the kernel's output axis names by default.

Under `use_sharding`, `Linear` and `LinearGeneral` constrain their output by
activation names: the leading dimensions ``activation_batch`` (and
``activation_length`` for rank-3 outputs), then the activation name of each
kernel output axis (``mlp`` -> ``activation_mlp``, ``embed`` ->
``activation_embed``, ``heads``, ``kv``, ``kv_heads``, ``vocab`` likewise).
Unannotated kernels, other ranks, or rules without those names: no
constraint. ``activation_axes=None`` switches it off; a tuple of names
replaces it (also for `Einsum`, which has no default) and is checked like
`spmdnnx.spmd.constrain`: a wrong rank or a name without a rule raises.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> layer = Linear(3, 4, kernel_axes=("embed", "mlp"), rngs=Rngs(0))
>>> layer(jnp.ones((2, 3))).shape, layer.bias.logical_axes
((2, 4), ('mlp',))
"""

from __future__ import annotations

import math
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import opt_einsum

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx.nn import initializers
from spmdnnx._rngs import Rngs
from spmdnnx._variables import unbox
from spmdnnx.spmd._constrain import constrain, layout_activation
from spmdnnx.spmd._context import current_context

_DEFAULT_KERNEL_INIT = initializers.default_kernel_init()
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _bias_default(kernel_axes: Any, n_out: int, n_batch: int = 0) -> tuple | None:
  if kernel_axes is None:
    return None
  return tuple(kernel_axes)[:n_batch] + tuple(kernel_axes)[-n_out:]


class Linear(Module):
  """A dense layer ``y = x @ kernel + bias`` over the last input axis.

  Args:
    in_features: size of the input's last axis.
    out_features: size of the output's last axis.
    use_bias: whether to add a bias.
    dtype: compute dtype (None: the common dtype of inputs and params).
    param_dtype: storage dtype of the parameters.
    precision: matmul precision (`jax.lax.Precision`).
    kernel_init, bias_init: initializers (may carry `with_partitioning` axes).
    kernel_axes: logical axes of the (in, out) kernel; default unannotated.
    bias_axes: logical axes of the bias; default the kernel's output axis.
    activation_axes: output layout under `use_sharding`: ``"default"`` (see
      the module doc), a tuple of logical names, or None (no constraint).
    rngs: random streams; the kernel is drawn from ``rngs.params()``.
    dot_general: the contraction (default `jax.lax.dot_general`).
    promote_dtype: ``f((inputs, kernel, bias), dtype=...) -> tuple``, casts the
      operands before the matmul (default: to ``dtype`` or their common dtype).
    preferred_element_type: the matmul's output dtype (passed to dot_general).
    kernel_metadata, bias_metadata: extra Param metadata (Flax's spelling;
      ``out_sharding``/``sharding_names`` there are the logical axes).

  Call with ``out_sharding=`` (a `PartitionSpec`) on an explicit-axes mesh to
  choose the output's sharding.

  Raises:
    ConfigError: for non-positive feature counts.
    MetadataError: for axes that do not fit the parameter shapes.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               precision: Any = None, kernel_init: Callable = _DEFAULT_KERNEL_INIT,
               bias_init: Callable = initializers.zeros,
               dot_general: Callable = lax.dot_general,
               promote_dtype: Callable = _common.promote_dtypes,
               preferred_element_type: Any = None,
               kernel_axes: Sequence[str | None] | None = None,
               bias_axes: Sequence[str | None] | None = None,
               activation_axes: Any = "default", rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    _common.check_positive("Linear", in_features=in_features, out_features=out_features)
    _common.set_attrs(self, in_features=in_features, out_features=out_features,
                      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      precision=precision, dot_general=dot_general,
                      promote_dtype=promote_dtype,
                      preferred_element_type=preferred_element_type,
                      activation_axes=_common.check_activation_axes("Linear", activation_axes))
    self.kernel = _common.make_param(
        "Linear", "kernel", kernel_init, rngs.params(), (in_features, out_features),
        param_dtype, kernel_axes, metadata=kernel_metadata)
    _common.set_attrs(self, bias=None)
    if use_bias:
      self.bias = _common.make_param(
          "Linear", "bias", bias_init, rngs.params(), (out_features,), param_dtype,
          bias_axes, _bias_default(self.kernel.logical_axes, 1), metadata=bias_metadata)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    # The kernel's own size: inside shard_map it is the local shard's.
    _common.check_features(self, inputs, -1, self.kernel.value.shape[0], "in features")
    bias = self.bias.value if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel.value, bias), dtype=self.dtype)
    y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision,
                         **_common.call_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      y = _common.add_bias(y, jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)))
    return y if out_sharding is not None else _layout_output(self, y, 1)


def _as_tuple(owner: str, name: str, value: Any) -> tuple:
  value = (value,) if isinstance(value, int) else tuple(value)
  _common.check_positive(owner, **{f"{name}[{i}]": v for i, v in enumerate(value)})
  return value


class LinearGeneral(Module):
  """A dense layer contracting several input axes into several output axes.

  Args:
    in_features: size(s) of the contracted input axes.
    out_features: size(s) of the produced output axes.
    axis: the input axes to contract (int or tuple, same length as in_features).
    batch_axis: ``{axis: size}`` of leading input axes that are batched (each
      batch entry has its own kernel); consecutive from 0.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
    promote_dtype, preferred_element_type, kernel_metadata, bias_metadata: as
      `Linear`.
    dot_general: the contraction (None: `jax.lax.dot_general`).
    dot_general_cls: alternatively a class whose instance is the contraction.
    kernel_axes: logical axes of the ``in_features + out_features`` kernel.
    bias_axes: logical axes of the bias (default: the kernel's output axes).
    activation_axes: output layout under `use_sharding`, as `Linear`.
    rngs: random streams.

  The initializer sees the kernel flattened to ``(prod(in), prod(out))`` so
  fan-in based scaling counts every contracted axis.

  Raises:
    ConfigError: axis and in_features of different lengths, or a bad batch_axis.

  >>> from spmdnnx._rngs import Rngs
  >>> q = LinearGeneral(8, (2, 4), rngs=Rngs(0))
  >>> q(jnp.ones((3, 8))).shape
  (3, 2, 4)
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int],
               *, axis: int | Sequence[int] = -1, batch_axis: Mapping[int, int] = _NO_METADATA,
               use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable = _DEFAULT_KERNEL_INIT,
               bias_init: Callable = initializers.zeros,
               dot_general: Callable | None = None, dot_general_cls: Any = None,
               promote_dtype: Callable = _common.promote_dtypes,
               preferred_element_type: Any = None,
               kernel_axes: Sequence[str | None] | None = None,
               bias_axes: Sequence[str | None] | None = None,
               activation_axes: Any = "default", rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    name = "LinearGeneral"
    self.in_features = _as_tuple(name, "in_features", in_features)
    self.out_features = _as_tuple(name, "out_features", out_features)
    self.axis = (axis,) if isinstance(axis, int) else tuple(axis)
    if len(self.axis) != len(self.in_features):
      raise errors.ConfigError(
          f"{name}: axis {self.axis} names {len(self.axis)} input axes but "
          f"in_features {self.in_features} has {len(self.in_features)}; give one "
          "contracted axis per in_features entry.")
    batch_axis = dict(batch_axis)
    if batch_axis and sorted(batch_axis) != list(range(len(batch_axis))):
      raise errors.ConfigError(
          f"{name}: batch_axis keys {sorted(batch_axis)} must be consecutive leading "
          "axes starting from 0, e.g. {0: 4}.", value=batch_axis)
    self.batch_axis = tuple(sorted(batch_axis.items()))
    _common.set_attrs(self, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      precision=precision, dot_general=dot_general,
                      dot_general_cls=dot_general_cls, promote_dtype=promote_dtype,
                      preferred_element_type=preferred_element_type,
                      activation_axes=_common.check_activation_axes(name, activation_axes))
    batch_shape = tuple(size for _, size in self.batch_axis)
    shape = batch_shape + self.in_features + self.out_features
    flat = (math.prod(batch_shape) * math.prod(self.in_features),
            math.prod(self.out_features))

    def flat_init(key, _shape, dtype):
      return unbox(kernel_init(key, flat, dtype)).reshape(shape)

    flat_init.metadata = getattr(kernel_init, "metadata", {})
    self.kernel = _common.make_param(
        name, "kernel", flat_init, rngs.params(), shape, param_dtype, kernel_axes,
        metadata=kernel_metadata)
    _common.set_attrs(self, bias=None)
    if use_bias:
      bias_shape = batch_shape + self.out_features

      def flat_bias_init(key, _shape, dtype):
        return unbox(bias_init(key, (math.prod(bias_shape),), dtype)).reshape(bias_shape)

      flat_bias_init.metadata = getattr(bias_init, "metadata", {})
      self.bias = _common.make_param(
          name, "bias", flat_bias_init, rngs.params(), bias_shape, param_dtype,
          bias_axes, _bias_default(self.kernel.logical_axes, len(self.out_features),
                                   len(batch_shape)),
          metadata=bias_metadata)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    ndim = jnp.ndim(inputs)
    axes = tuple(a % ndim for a in self.axis) if ndim else ()
    got = tuple(jnp.shape(inputs)[a] for a in axes) if len(axes) == len(self.axis) else ()
    if got != self.in_features or len(set(axes)) != len(axes):
      raise errors.ShapeError(
          f"{_common.layer_name(self)}: expected input axes {self.axis} to have "
          f"sizes {self.in_features}, got an input of shape {tuple(jnp.shape(inputs))}.")
    bias = self.bias.value if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel.value, bias), dtype=self.dtype)
    n_batch = len(self.batch_axis)
    batch_axes = tuple(sorted(a % ndim for a, _ in self.batch_axis))
    contract = tuple(range(n_batch, n_batch + len(axes)))
    if self.dot_general_cls is not None:
      dot_general = self.dot_general_cls()
    else:
      dot_general = self.dot_general if self.dot_general is not None else lax.dot_general
    y = dot_general(x, kernel, ((axes, contract), (batch_axes, tuple(range(n_batch)))),
                    precision=self.precision,
                    **_common.call_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      expanded = tuple(x.shape[a] if a in batch_axes else 1
                       for a in range(ndim) if a not in axes)
      y = _common.add_bias(y, jnp.reshape(bias, expanded + self.out_features))
    if out_sharding is not None or n_batch:
      return y
    return _layout_output(self, y, len(self.out_features))


_OPERAND = re.compile(r"^[a-zA-Z]*(\.\.\.)?[a-zA-Z]*$")


class Einsum(Module):
  """A layer computing ``einsum(einsum_str, inputs, kernel) (+ bias)``.

  Args:
    einsum_str: a two-operand equation, inputs first, e.g. ``"bd,dh->bh"``.
    kernel_shape: the kernel's shape (one entry per letter of operand two).
    bias_shape: optional bias shape: the sizes of the output letters that
      appear in the kernel, in output order (e.g. ``(h,)`` for ``"bd,dh->bh"``).
    dtype, param_dtype, precision, kernel_init, bias_init, promote_dtype,
    preferred_element_type, kernel_metadata, bias_metadata: as `Linear`.
    einsum_op: the einsum function (default `jax.numpy.einsum`).
    kernel_axes, bias_axes: logical axes (default: unannotated, and the bias
      takes the kernel axes of its letters).
    activation_axes: a tuple of logical names to constrain the output to under
      `use_sharding`; the default (``"default"`` or None) adds no constraint.
    rngs: random streams.

  Raises:
    ConfigError: when the equation does not fit the kernel or bias shape.

  >>> from spmdnnx._rngs import Rngs
  >>> layer = Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=Rngs(0))
  >>> layer(jnp.ones((1, 3, 8))).shape
  (1, 3, 2, 4)
  """

  def __init__(self, einsum_str: str, kernel_shape: Sequence[int],
               bias_shape: Sequence[int] | None = None, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable = _DEFAULT_KERNEL_INIT,
               bias_init: Callable = initializers.zeros,
               promote_dtype: Callable = _common.promote_dtypes,
               einsum_op: Callable = jnp.einsum, preferred_element_type: Any = None,
               kernel_axes: Sequence[str | None] | None = None,
               bias_axes: Sequence[str | None] | None = None,
               activation_axes: Any = "default", rngs: Rngs,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA):
    self.einsum_str = einsum_str.replace(" ", "")
    lhs, kernel_letters, out = self._parse(self.einsum_str)
    kernel_shape = tuple(kernel_shape)
    n_letters = len(kernel_letters.replace("...", ""))
    if ("..." not in kernel_letters and n_letters != len(kernel_shape)) or (
        n_letters > len(kernel_shape)):
      raise errors.ConfigError(
          f"Einsum: the kernel operand {kernel_letters!r} of {einsum_str!r} has "
          f"{n_letters} axes but kernel_shape {kernel_shape} has "
          f"{len(kernel_shape)}; make them agree.")
    _common.check_positive("Einsum", **{f"kernel_shape[{i}]": s
                                        for i, s in enumerate(kernel_shape)})
    _common.set_attrs(self, dtype=dtype, param_dtype=param_dtype, precision=precision,
                      kernel_shape=kernel_shape, bias_shape=None,
                      promote_dtype=promote_dtype, einsum_op=einsum_op,
                      preferred_element_type=preferred_element_type,
                      activation_axes=_common.check_activation_axes("Einsum", activation_axes))
    self.kernel = _common.make_param(
        "Einsum", "kernel", kernel_init, rngs.params(), kernel_shape, param_dtype,
        kernel_axes, metadata=kernel_metadata)
    _common.set_attrs(self, bias=None)
    if bias_shape is not None:
      bias_shape = (bias_shape,) if isinstance(bias_shape, int) else tuple(bias_shape)
      default = None
      if "..." not in kernel_letters:
        own = [c for c in out if c in kernel_letters]
        sizes = tuple(kernel_shape[kernel_letters.index(c)] for c in own)
        k_axes = self.kernel.logical_axes
        if k_axes is not None and bias_shape == sizes:  # else: refused when called
          default = tuple(k_axes[kernel_letters.index(c)] for c in own)
      self.bias_shape = bias_shape
      self.bias = _common.make_param(
          "Einsum", "bias", bias_init, rngs.params(), bias_shape, param_dtype, bias_axes,
          default, metadata=bias_metadata)

  @staticmethod
  def _parse(einsum_str: str) -> tuple[str, str, str]:
    parts = einsum_str.split("->")
    operands = parts[0].split(",")
    if len(parts) != 2 or len(operands) != 2 or not all(
        _OPERAND.match(p) for p in operands + [parts[1]]):
      raise errors.ConfigError(
          f"Einsum: einsum_str {einsum_str!r} must have the form "
          "'<inputs>,<kernel>-><output>' (two operands and an explicit output), "
          "e.g. 'bd,dh->bh'.")
    return operands[0], operands[1], parts[1]

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding: Any = None) -> jax.Array:
    eq = self.einsum_str if einsum_str is None else einsum_str.replace(" ", "")
    lhs, _, out = self._parse(eq)
    if "..." not in lhs and len(lhs) != jnp.ndim(inputs):
      raise errors.ShapeError(
          f"{_common.layer_name(self)}: the input operand {lhs!r} of {eq!r} has "
          f"{len(lhs)} axes but the input has shape {tuple(jnp.shape(inputs))}.")
    bias = self.bias.value if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel.value, bias), dtype=self.dtype)
    try:
      y = self.einsum_op(eq, x, kernel, precision=self.precision,
                         **_common.call_kwargs(out_sharding, self.preferred_element_type))
    except ValueError as e:
      raise errors.ShapeError(
          f"{_common.layer_name(self)}: input of shape {tuple(x.shape)} does not fit "
          f"{eq!r} with kernel shape {self.kernel_shape}: {e}") from None
    if bias is not None:
      y = _common.add_bias(y, jnp.reshape(bias, self._bias_broadcast(eq, x, kernel, bias)))
    if isinstance(self.activation_axes, tuple) and out_sharding is None:
      y = constrain(y, self.activation_axes, name=_common.layer_name(self))
    return y

  def _bias_broadcast(self, eq: str, x: jax.Array, kernel: jax.Array,
                      bias: jax.Array) -> list:
    """The bias reshaped to broadcast against the output of ``eq`` (ellipses expanded).

    Raises:
      ConfigError: the bias does not have the sizes of the output letters that
        appear in the kernel (checked here, when called, as Flax does).
    """
    operands, result, _ = opt_einsum.parser.parse_einsum_input((eq, x, kernel))
    rhs = {c: i for i, c in enumerate(operands.split(",")[1])}
    sizes = tuple(kernel.shape[rhs[c]] for c in result if c in rhs)
    if tuple(bias.shape) != sizes:
      raise errors.ConfigError(
          f"{_common.layer_name(self)}: bias_shape {tuple(bias.shape)} must equal the "
          f"sizes {sizes} of the output letters "
          f"{''.join(c for c in result if c in rhs)!r} of {eq!r} that appear in the "
          "kernel; build the Einsum with that bias_shape.", paths=["bias"],
          shapes=[tuple(bias.shape), sizes])
    return [kernel.shape[rhs[c]] if c in rhs else 1 for c in result]


def _layout_output(layer: Any, y: jax.Array, n_out: int) -> jax.Array:
  """Constrains a dense layer's output by activation names (see the module doc)."""
  setting = layer.activation_axes
  if setting is None or current_context() is None:
    return y
  if isinstance(setting, tuple):  # the user's names: checked like spmdnnx.spmd.constrain
    return constrain(y, setting, name=_common.layer_name(layer))
  kernel_axes = layer.kernel.logical_axes
  features = _common.activation_names(None if kernel_axes is None else kernel_axes[-n_out:])
  if features is None:
    return y
  return layout_activation(y, _common.output_axes(setting, y.ndim, *features))
