"""Conv and ConvTranspose against explicit numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply, param_grads

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import Conv, ConvTranspose, initializers


def conv_ref(x, w, stride, pad, dil=(1, 1), groups=1):
  """Channels-last 2-d cross-correlation with explicit (lo, hi) padding."""
  x = np.pad(x, [(0, 0)] + list(pad) + [(0, 0)])
  b, h, wd, _ = x.shape
  kh, kw, cin_g, cout = w.shape
  eh, ew = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
  oh, ow = (h - eh) // stride[0] + 1, (wd - ew) // stride[1] + 1
  out = np.zeros((b, oh, ow, cout), np.float64)
  cout_g = cout // groups
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride[0]:i * stride[0] + eh:dil[0], j * stride[1]:j * stride[1] + ew:dil[1]]
      for g in range(groups):
        p = patch[..., g * cin_g:(g + 1) * cin_g]
        out[:, i, j, g * cout_g:(g + 1) * cout_g] = np.einsum(
            "bhwc,hwco->bo", p, w[..., g * cout_g:(g + 1) * cout_g])
  return out


def _x(shape, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape))


@pytest.mark.parametrize("strides,padding,pad,dil,groups", [
    (1, "VALID", ((0, 0), (0, 0)), 1, 1),
    (1, "SAME", ((1, 1), (1, 1)), 1, 1),
    (2, ((1, 0), (0, 2)), ((1, 0), (0, 2)), 1, 1),
    (1, 1, ((1, 1), (1, 1)), 2, 2),
])
def test_conv2d_matches_reference(strides, padding, pad, dil, groups):
  conv = Conv(4, 6, (3, 3), strides, padding=padding, kernel_dilation=dil,
              feature_group_count=groups, bias_init=initializers.normal(1.0),
              rngs=nnx.Rngs(0))
  x = _x((2, 7, 7, 4))
  s = (strides, strides)
  ref = conv_ref(x, np.asarray(conv.kernel.value), s, pad, (dil, dil), groups)
  ref = ref + np.asarray(conv.bias.value)
  close(conv(jnp.asarray(x)), ref, 1e-4)


def test_conv1d_causal_unbatched_and_multi_batch():
  conv = Conv(2, 3, 3, padding="CAUSAL", use_bias=False, rngs=nnx.Rngs(0))
  assert conv.kernel.shape == (3, 2, 3)
  x = _x((5, 2))
  w = np.asarray(conv.kernel.value)
  xp = np.pad(x, ((2, 0), (0, 0)))
  ref = np.stack([np.einsum("kc,kco->o", xp[t:t + 3], w) for t in range(5)])
  close(conv(jnp.asarray(x)), ref, 1e-5)
  y = conv(jnp.asarray(np.stack([[x, x]] * 2)))
  assert y.shape == (2, 2, 5, 3)
  close(y[1, 0], ref, 1e-5)


def test_conv_circular_padding():
  conv = Conv(1, 1, 3, padding="CIRCULAR", use_bias=False, kernel_init=initializers.ones,
              rngs=nnx.Rngs(0))
  y = conv(jnp.arange(4.0).reshape(1, 4, 1))
  close(y[0, :, 0], [3 + 0 + 1, 0 + 1 + 2, 1 + 2 + 3, 2 + 3 + 0])


def test_conv_grad_and_jit():
  conv = Conv(2, 2, (2, 2), padding="VALID", rngs=nnx.Rngs(0))
  x = _x((1, 3, 3, 2))
  grads = param_grads(conv, lambda m: jnp.sum(m(jnp.asarray(x))))
  ref = np.zeros((2, 2, 2, 2))
  for i in range(2):
    for j in range(2):
      ref += np.broadcast_to(x[0, i:i + 2, j:j + 2, :, None], (2, 2, 2, 2))
  close(grads["kernel"].value, ref, 1e-4)
  close(grads["bias"].value, [4.0, 4.0])
  close(jit_apply(conv, lambda m, x: m(x), jnp.asarray(x)), conv(jnp.asarray(x)))


def test_conv_bf16_compute():
  conv = Conv(2, 2, (3,), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(_x((1, 5, 2)))
  y = conv(x)
  assert y.dtype == jnp.bfloat16 and conv.kernel.dtype == jnp.float32
  ref = conv_ref(np.asarray(x)[:, None], np.asarray(conv.kernel.value)[None],
                 (1, 1), ((0, 0), (1, 1)))[:, 0]
  close(y, ref, 5e-2)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_matches_scatter_reference(transpose_kernel):
  # lax convention: without transpose_kernel the kernel is applied as a
  # correlation over the stride-dilated input, i.e. scattered flipped.
  up = ConvTranspose(2, 3, (3,), strides=2, padding="VALID", use_bias=False,
                     transpose_kernel=transpose_kernel, rngs=nnx.Rngs(0))
  x = _x((1, 4, 2))
  w = np.asarray(up.kernel.value)
  out = np.zeros((1, (4 - 1) * 2 + 3, 3))
  for i in range(4):
    for j in range(3):
      if transpose_kernel:
        out[:, i * 2 + j] += x[:, i] @ w[j].T
      else:
        out[:, i * 2 + (2 - j)] += x[:, i] @ w[j]
  close(up(jnp.asarray(x)), out, 1e-5)


def test_conv_transpose_transpose_kernel_shape():
  up = ConvTranspose(4, 2, (2, 2), strides=2, transpose_kernel=True,
                     kernel_axes=(None, None, "mlp", "embed"), rngs=nnx.Rngs(0))
  assert up.kernel.shape == (2, 2, 2, 4) and up.bias.logical_axes == ("mlp",)
  assert up(jnp.ones((1, 3, 3, 4))).shape == (1, 6, 6, 2)


def test_conv_errors():
  with pytest.raises(errors.ConfigError, match=r"Conv: padding 'FULL' is not one of"):
    Conv(2, 2, 3, padding="FULL", rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"'CAUSAL' only applies to 1 spatial"):
    Conv(2, 2, (3, 3), padding="CAUSAL", rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"divisible by feature_group_count \(3\)"):
    Conv(4, 6, 3, feature_group_count=3, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"in_features must be a positive int, got 0"):
    Conv(0, 6, 3, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"strides must be a positive int or a tuple of 2"):
    Conv(2, 2, (3, 3), strides=(1, 2, 3), rngs=nnx.Rngs(0))
  with pytest.raises(errors.MetadataError, match=r"kernel_axes \('embed', 'mlp'\) has 2 entries"):
    Conv(2, 2, (3, 3), kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
  conv = Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match=r"Conv: expected an input whose axis -1 has 3 "
                                              r"in features, got shape \(1, 5, 5, 2\)"):
    conv(jnp.ones((1, 5, 5, 2)))
  with pytest.raises(errors.ShapeError, match=r"Conv: expected an input of shape \(\*batch, 2 spatial"):
    conv(jnp.ones((5, 3)))
  with pytest.raises(errors.ConfigError, match="not supported for transposed"):
    ConvTranspose(2, 2, 3, padding="REFLECT", rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"Conv: kernel_size \(1, 1, 1, 1\) must have 1 to 3 "
                                               r"entries") as e:
    Conv(2, 2, (1, 1, 1, 1), rngs=nnx.Rngs(0))
  assert e.value.argument == "kernel_size" and e.value.value == (1, 1, 1, 1)
  with pytest.raises(errors.ConfigError, match=r"explicit padding \(\(1, 2, 3\),\) must be an int "
                                               r"or 2 ints") as e:
    Conv(2, 2, (3, 3), padding=((1, 2, 3),), rngs=nnx.Rngs(0))
  assert e.value.argument == "padding"
  with pytest.raises(errors.ShapeError, match="expected an input of shape") as e:
    conv(jnp.ones((5, 3)))
  assert e.value.shapes == [(5, 3)]


def test_conv_reflect_padding():
  conv = Conv(1, 1, 3, padding="REFLECT", use_bias=False, kernel_init=initializers.ones,
              rngs=nnx.Rngs(0))
  y = conv(jnp.arange(4.0).reshape(1, 4, 1))
  # reflected input: [1, 0, 1, 2, 3, 2]
  close(y[0, :, 0], [1 + 0 + 1, 0 + 1 + 2, 1 + 2 + 3, 2 + 3 + 2])


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_transpose_circular_is_periodic_and_keeps_the_sum(stride):
  up = ConvTranspose(1, 1, 3, strides=stride, padding="CIRCULAR", use_bias=False,
                     kernel_init=initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = _x((1, 5, 1))
  y = up(jnp.asarray(x))
  assert y.shape == (1, 5 * stride, 1)
  # every input element reaches every kernel tap exactly once (wrapped around)
  close(jnp.sum(y), np.sum(x) * np.sum(np.asarray(up.kernel.value)), 1e-4)
  # shifting the input by one step shifts the output by one stride
  shifted = up(jnp.roll(jnp.asarray(x), 1, axis=1))
  close(shifted, jnp.roll(y, stride, axis=1), 1e-5)


def test_conv_flax_keywords():
  seen = {}

  def my_conv(*args, **kwargs):
    seen.update(kwargs)
    return jax.lax.conv_general_dilated(*args, **kwargs)

  conv = Conv(2, 3, 3, strides=None, input_dilation=None, conv_general_dilated=my_conv,
              dtype=jnp.bfloat16, preferred_element_type=jnp.float32,
              kernel_metadata={"out_sharding": (None, None, "mlp")}, rngs=nnx.Rngs(0))
  assert conv.strides == (1,) and conv.kernel.logical_axes == (None, None, "mlp")
  assert conv.bias.logical_axes == ("mlp",)
  assert conv(jnp.ones((1, 5, 2))).dtype == jnp.float32
  assert seen["preferred_element_type"] == jnp.float32
  up = ConvTranspose(2, 3, 3, dtype=jnp.bfloat16, preferred_element_type=jnp.float32,
                     rngs=nnx.Rngs(0))
  assert up(jnp.ones((1, 5, 2))).dtype == jnp.float32
