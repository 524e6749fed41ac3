"""Linear, LinearGeneral and Einsum: numerics, dtypes, axes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply, param_grads

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import Einsum, Linear, LinearGeneral, initializers


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_linear_forward_and_grad_match_reference():
  layer = Linear(3, 4, bias_init=initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = _x((2, 5, 3))
  w, b = np.asarray(layer.kernel.value), np.asarray(layer.bias.value)
  close(layer(x), np.asarray(x) @ w + b)
  grads = param_grads(layer, lambda m: jnp.sum(m(x) ** 2))
  y = np.asarray(x) @ w + b
  ref_gw = np.einsum("bti,bto->io", np.asarray(x), 2 * y)
  close(grads["kernel"].value, ref_gw, 1e-4)
  close(grads["bias"].value, (2 * y).sum((0, 1)), 1e-4)


def test_linear_under_jit_and_no_bias():
  layer = Linear(3, 2, use_bias=False, rngs=nnx.Rngs(1))
  x = _x((4, 3))
  assert layer.bias is None
  close(jit_apply(layer, lambda m, x: m(x), x), x @ layer.kernel.value)


@pytest.mark.parametrize("dtype,param_dtype,out", [
    (None, jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.float32, jnp.bfloat16),
    (None, jnp.bfloat16, jnp.bfloat16),
])
def test_linear_mixed_precision(dtype, param_dtype, out):
  layer = Linear(8, 4, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  assert layer.kernel.dtype == param_dtype
  x = _x((2, 8)).astype(out if dtype is None else jnp.float32)
  y = layer(x)
  assert y.dtype == out
  ref = np.asarray(x, np.float32) @ np.asarray(layer.kernel.value, np.float32)
  close(y, ref, 5e-2 if out == jnp.bfloat16 else 1e-5)


def test_linear_bf16_input_with_f32_params_computes_in_f32():
  layer = Linear(2, 2, rngs=nnx.Rngs(0))
  assert layer(jnp.ones((1, 2), jnp.bfloat16)).dtype == jnp.float32


def test_linear_axes_argument_and_with_partitioning():
  a = Linear(3, 4, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
  assert a.kernel.logical_axes == ("embed", "mlp") and a.bias.logical_axes == ("mlp",)
  init = nnx.with_partitioning(initializers.lecun_normal(), ("embed", "mlp"))
  b = Linear(3, 4, kernel_init=init, rngs=nnx.Rngs(0))
  assert b.kernel.logical_axes == ("embed", "mlp") and b.bias.logical_axes == ("mlp",)
  c = Linear(3, 4, rngs=nnx.Rngs(0))
  assert c.kernel.logical_axes is None and c.bias.logical_axes is None


def test_linear_bad_arguments():
  with pytest.raises(errors.ConfigError, match=r"Linear: out_features must be a positive int, got -2"):
    Linear(3, -2, rngs=nnx.Rngs(0))
  with pytest.raises(errors.MetadataError,
                     match=r"Linear: kernel_axes \('embed',\) has 1 entries but the kernel "
                           r"has shape \(3, 4\) \(2 dims\)"):
    Linear(3, 4, kernel_axes=("embed",), rngs=nnx.Rngs(0))
  init = nnx.with_partitioning(initializers.lecun_normal(), ("embed", "mlp"))
  with pytest.raises(errors.MetadataError, match=r"conflicts with the axes \('embed', 'mlp'\)"):
    Linear(3, 4, kernel_init=init, kernel_axes=("mlp", "embed"), rngs=nnx.Rngs(0))


def test_linear_shape_error_names_layer_and_shapes():
  layer = Linear(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError,
                     match=r"Linear: expected an input whose axis -1 has 3 in features, "
                           r"got shape \(2, 5\)"):
    layer(jnp.ones((2, 5)))


def test_linear_general_matches_reference_and_axes():
  layer = LinearGeneral((2, 3), 5, axis=(-2, -1), bias_init=initializers.ones,
                        kernel_axes=("heads", "kv", "embed"), rngs=nnx.Rngs(0))
  x = _x((4, 2, 3))
  ref = np.einsum("bhk,hke->be", np.asarray(x), np.asarray(layer.kernel.value)) + 1.0
  close(layer(x), ref)
  assert layer.bias.logical_axes == ("embed",)
  with pytest.raises(errors.ShapeError, match=r"expected input axes \(-2, -1\) to have sizes \(2, 3\)"):
    layer(jnp.ones((4, 3, 3)))
  with pytest.raises(errors.ConfigError, match="axis"):
    LinearGeneral((2, 3), 5, axis=-1, rngs=nnx.Rngs(0))


def test_einsum_forward_bias_and_grad():
  layer = Einsum("btd,dnh->btnh", (4, 2, 3), (2, 3), bias_init=initializers.normal(1.0),
                 kernel_axes=("embed", "heads", "kv"), rngs=nnx.Rngs(0))
  assert layer.bias.logical_axes == ("heads", "kv")
  x = _x((2, 5, 4))
  k, b = np.asarray(layer.kernel.value), np.asarray(layer.bias.value)
  ref = np.einsum("btd,dnh->btnh", np.asarray(x), k) + b
  close(layer(x), ref, 1e-4)
  grads = param_grads(layer, lambda m: jnp.sum(m(x)))
  close(grads["bias"].value, np.full((2, 3), 10.0))
  close(grads["kernel"].value, np.broadcast_to(np.asarray(x).sum((0, 1))[:, None, None],
                                                (4, 2, 3)), 1e-4)


def test_einsum_errors():
  with pytest.raises(errors.ConfigError, match=r"must have the form '<inputs>,<kernel>-><output>'"):
    Einsum("bd,dh", (2, 3), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"kernel operand 'dh' .* has 2 axes but kernel_shape"):
    Einsum("bd,dh->bh", (2, 3, 4), rngs=nnx.Rngs(0))
  wrong_bias = Einsum("bd,dh->bh", (2, 3), (2,), rngs=nnx.Rngs(0))  # checked when called
  assert wrong_bias.bias.shape == (2,)
  with pytest.raises(errors.ConfigError,
                     match=r"Einsum: bias_shape \(2,\) must equal the sizes \(3,\) of the "
                     r"output letters 'h' of 'bd,dh->bh' that appear in the kernel"):
    wrong_bias(jnp.ones((1, 2)))
  layer = Einsum("bd,dh->bh", (2, 3), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match=r"Einsum: the input operand 'bd' .* has 2 axes"):
    layer(jnp.ones((1, 2, 2)))


# --- Flax keyword arguments -------------------------------------------------


@pytest.mark.parametrize("cls,args", [(Linear, (3, 4)), (LinearGeneral, (3, (2, 2)))])
def test_preferred_element_type_sets_the_matmul_output_dtype(cls, args):
  layer = cls(*args, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
              preferred_element_type=jnp.float32, use_bias=False, rngs=nnx.Rngs(0))
  x = _x((2, 3)).astype(jnp.bfloat16)
  y = layer(x)
  assert y.dtype == jnp.float32
  kernel = np.asarray(layer.kernel.value, np.float32).reshape(3, -1)
  close(y.reshape(2, -1), np.asarray(x, np.float32) @ kernel, 1e-2)
  assert cls(*args, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, use_bias=False,
             rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16


def test_einsum_preferred_element_type_and_einsum_op():
  seen = {}

  def my_einsum(eq, *operands, **kwargs):
    seen.update(kwargs)
    return jnp.einsum(eq, *operands, **kwargs)

  layer = Einsum("bd,dh->bh", (3, 4), dtype=jnp.bfloat16, einsum_op=my_einsum,
                 preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
  assert layer(_x((2, 3))).dtype == jnp.float32
  assert seen["preferred_element_type"] == jnp.float32 and "out_sharding" not in seen


def test_custom_promote_dtype_and_dot_general_are_used():
  calls = []

  def keep(arrays, dtype=None, inexact=True):
    calls.append(dtype)
    return arrays

  def dot(x, k, dims, precision=None):  # no preferred_element_type/out_sharding kwargs
    return jnp.full(x.shape[:-1] + k.shape[1:], 7.0, x.dtype)

  layer = Linear(3, 2, promote_dtype=keep, dot_general=dot, dtype=jnp.float16,
                 rngs=nnx.Rngs(0))
  y = layer(jnp.ones((1, 3)))
  close(y, np.full((1, 2), 7.0))
  assert calls == [jnp.float16]


def test_default_promote_dtype_casts_to_dtype_and_keeps_ints_inexact():
  from spmdnnx.nn._common import promote_dtypes
  a, b, c = promote_dtypes((jnp.ones(2, jnp.float32), None, jnp.ones(2, jnp.int32)))
  assert a.dtype == c.dtype == jnp.float32 and b is None
  (h,) = promote_dtypes((jnp.ones(2),), dtype=jnp.float16)
  assert h.dtype == jnp.float16
  (i,) = promote_dtypes((jnp.ones(2, jnp.int8),), dtype=jnp.int8, inexact=False)
  assert i.dtype == jnp.int8
  with pytest.raises(errors.ConfigError, match="dtype must be a floating"):
    promote_dtypes((jnp.ones(2),), dtype=jnp.int32)


def test_kernel_metadata_gives_axes_and_extra_metadata():
  layer = Linear(3, 4, kernel_metadata={"out_sharding": ("embed", "mlp"), "note": 1},
                 bias_metadata={"sharding_names": ("mlp",)}, rngs=nnx.Rngs(0))
  assert layer.kernel.logical_axes == ("embed", "mlp") == layer.kernel.out_sharding
  assert layer.kernel.get_metadata()["note"] == 1
  assert layer.bias.logical_axes == ("mlp",)
  # a spec shorter than the rank leaves trailing dims unsharded, as a PartitionSpec
  lg = LinearGeneral(3, (2, 4), kernel_metadata={"out_sharding": ("embed",)},
                     rngs=nnx.Rngs(0))
  assert lg.kernel.logical_axes == ("embed", None, None)
  with pytest.raises(errors.MetadataError, match=r"kernel_axes=\('a', 'b'\) conflicts with "
                                                 r"the axes \('c', 'd'\) in kernel_metadata"):
    Linear(3, 4, kernel_axes=("a", "b"), kernel_metadata={"out_sharding": ("c", "d")},
           rngs=nnx.Rngs(0))


def test_linear_general_batch_axis_has_a_kernel_per_batch_entry():
  layer = LinearGeneral(3, 2, axis=-1, batch_axis={0: 4}, bias_init=initializers.normal(1.0),
                        rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (4, 3, 2) and layer.bias.shape == (4, 2)
  x = _x((4, 5, 3))
  k, b = np.asarray(layer.kernel.value), np.asarray(layer.bias.value)
  ref = np.einsum("btd,bdh->bth", np.asarray(x), k) + b[:, None, :]
  close(layer(x), ref, 1e-4)
  with pytest.raises(errors.ConfigError, match=r"batch_axis keys \[1\] must be consecutive"):
    LinearGeneral(3, 2, batch_axis={1: 4}, rngs=nnx.Rngs(0))


def test_einsum_bias_covers_output_letters_in_the_kernel_even_if_shared():
  # 'b' is in the input and the kernel: the bias has an entry per b (Flax's rule)
  layer = Einsum("btd,bdh->bth", (2, 3, 4), (2, 4), bias_init=initializers.normal(1.0),
                 rngs=nnx.Rngs(0))
  x = _x((2, 5, 3))
  k, b = np.asarray(layer.kernel.value), np.asarray(layer.bias.value)
  close(layer(x), np.einsum("btd,bdh->bth", np.asarray(x), k) + b[:, None, :], 1e-4)
  # with an ellipsis the bias broadcasts by the expanded letters
  ell = Einsum("...d,dh->...h", (3, 4), 4, bias_init=initializers.ones, rngs=nnx.Rngs(0))
  close(ell(x), np.einsum("btd,dh->bth", np.asarray(x), np.asarray(ell.kernel.value)) + 1,
        1e-4)


def test_bias_follows_out_sharding_on_explicit_mesh():
  # The bias defaults to the kernel's output axis ("Y"); an out_sharding that
  # puts that dim on "X" must reshard the bias, not fail the add or drop it.
  from jax.sharding import AxisType, PartitionSpec as P
  mesh = jax.make_mesh((2, 2), ("X", "Y"), axis_types=(AxisType.Explicit,) * 2,
                       devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    layer = Linear(4, 8, kernel_metadata={"out_sharding": P(None, "Y")},
                   bias_init=initializers.ones, rngs=nnx.Rngs(0))
    assert tuple(layer.bias.value.sharding.spec) == ("Y",)
    x = jax.sharding.reshard(jnp.arange(16.0).reshape(4, 4), P("X", None))
    y = layer(x, out_sharding=P(None, "X"))
    assert str(jax.typeof(y)) == "float32[4,8@X]"
  close(np.asarray(y), np.asarray(x) @ np.asarray(layer.kernel.value) + 1.0, 1e-5)
