"""Same seed, same initial parameters as Flax NNX 0.12.8, for every layer type.

The numbers below were recorded by running Flax NNX 0.12.8 (jax 0.10.2, CPU)
with the same constructor calls; this file does not import Flax. For each
parameter: its shape, its first values (row-major) and the sum of all values.
A mismatch means a ported Flax model would start (and train) differently.
Keys come from ``fold_in(stream key, count)`` with the count advancing per
draw, so the order in which a layer draws its parameters matters too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx

ZEROS = "zeros"
ONES = "ones"


def _mlp(rngs):
  return nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 1, rngs=rngs))


LAYERS = {
    "Linear": lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    "Linear_nobias_seed1": lambda: nnx.Linear(5, 2, use_bias=False, rngs=nnx.Rngs(1)),
    "LinearGeneral": lambda: nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=nnx.Rngs(0)),
    "Einsum": lambda: nnx.Einsum("bi,ij->bj", (3, 4), (4,), rngs=nnx.Rngs(0)),
    "Conv": lambda: nnx.Conv(2, 3, kernel_size=(3, 3), rngs=nnx.Rngs(0)),
    "ConvTranspose": lambda: nnx.ConvTranspose(2, 3, kernel_size=(3,), rngs=nnx.Rngs(0)),
    "Embed": lambda: nnx.Embed(10, 4, rngs=nnx.Rngs(0)),
    "LayerNorm": lambda: nnx.LayerNorm(4, rngs=nnx.Rngs(0)),
    "RMSNorm": lambda: nnx.RMSNorm(4, rngs=nnx.Rngs(0)),
    "BatchNorm": lambda: nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
    "GroupNorm": lambda: nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)),
    "MultiHeadAttention": lambda: nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=4, decode=False, rngs=nnx.Rngs(0)),
    "LSTMCell": lambda: nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)),
    "GRUCell": lambda: nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)),
    "PReLU": lambda: nnx.PReLU(),
    "MLP_shared_rngs": lambda: _mlp(nnx.Rngs(7)),
}

# layer -> {param path: (shape, first values | ZEROS | ONES, sum)}, recorded from Flax.
FLAX = {
    'Linear': {
        'bias': ((4,), ZEROS, 0),
        'kernel': ((3, 4), (0.6178674, -0.5598722, -0.4644508), -2.272594),
    },
    'Linear_nobias_seed1': {
        'kernel': ((5, 2), (0.2570032, -0.3478963, 0.4341009), -0.07872261),
    },
    'LinearGeneral': {
        'bias': ((4, 5), ZEROS, 0),
        'kernel': ((2, 3, 4, 5), (0.4368983, -0.3958894, -0.3284163), 5.329449),
    },
    'Einsum': {
        'bias': ((4,), ZEROS, 0),
        'kernel': ((3, 4), (0.6178674, -0.5598722, -0.4644508), -2.272594),
    },
    'Conv': {
        'bias': ((3,), ZEROS, 0),
        'kernel': ((3, 3, 2, 3), (0.2522433, -0.2285669, -0.1896112), 1.505335),
    },
    'ConvTranspose': {
        'bias': ((3,), ZEROS, 0),
        'kernel': ((3, 2, 3), (0.4368983, -0.3958894, -0.3284163), -1.006894),
    },
    'Embed': {
        'embedding': ((10, 4), (0.5020071, -0.4531686, -0.3740861), -0.2137365),
    },
    'LayerNorm': {
        'bias': ((4,), ZEROS, 0),
        'scale': ((4,), ONES, 4),
    },
    'RMSNorm': {
        'scale': ((4,), ONES, 4),
    },
    'BatchNorm': {
        'bias': ((4,), ZEROS, 0),
        'scale': ((4,), ONES, 4),
    },
    'GroupNorm': {
        'bias': ((4,), ZEROS, 0),
        'scale': ((4,), ONES, 4),
    },
    'MultiHeadAttention': {
        'key/bias': ((2, 2), ZEROS, 0),
        'key/kernel': ((4, 2, 2), (0.6797945, 0.7079946, -0.2216672), 0.9493977),
        'out/bias': ((4,), ZEROS, 0),
        'out/kernel': ((2, 2, 4), (0.6153617, -0.517974, 0.1395937), 2.9667),
        'query/bias': ((2, 2), ZEROS, 0),
        'query/kernel': ((4, 2, 2), (0.5350889, -0.4848635, -0.4022262), -1.298581),
        'value/bias': ((2, 2), ZEROS, 0),
        'value/kernel': ((4, 2, 2), (-0.5436897, 0.3289154, -0.6790916), -1.385136),
    },
    'LSTMCell': {
        'hf/bias': ((4,), ZEROS, 0),
        'hf/kernel': ((4, 4), (0.6579696, -0.05107564, 0.1215205), 3.658677),
        'hg/bias': ((4,), ZEROS, 0),
        'hg/kernel': ((4, 4), (-0.2546027, -0.8952459, 0.1476278), -0.8727421),
        'hi/bias': ((4,), ZEROS, 0),
        'hi/kernel': ((4, 4), (-0.5388296, 0.5426311, -0.642492), -3.355),
        'ho/bias': ((4,), ZEROS, 0),
        'ho/kernel': ((4, 4), (-0.2602754, -0.3165486, 0.4973958), 3.22495),
        'if_/kernel': ((3, 4), (-1.237264, -1.129121, 0.1286911), -3.324213),
        'ig/kernel': ((3, 4), (0.7849591, 0.8175216, -0.2559592), 0.7210744),
        'ii/kernel': ((3, 4), (0.6178674, -0.5598722, -0.4644508), -2.272594),
        'io/kernel': ((3, 4), (-0.3872593, 0.3890168, 0.98396), 0.6329912),
    },
    'GRUCell': {
        'dense_h/kernel': ((4, 12), (0.5432401, 0.1597229, 0.09650513), 3.001161),
        'dense_i/bias': ((12,), ZEROS, 0),
        'dense_i/kernel': ((3, 12), (0.6178674, -0.5598722, -0.4644508), 1.852899),
    },
    'PReLU': {
        'negative_slope': ((), (0.01,), 0.01),
    },
    'MLP_shared_rngs': {
        'layers/0/bias': ((3,), ZEROS, 0),
        'layers/0/kernel': ((2, 3), (0.8354217, 0.1086406, -0.3991786), 1.098569),
        'layers/1/bias': ((1,), ZEROS, 0),
        'layers/1/kernel': ((3, 1), (-0.5082223, -0.4033528, -1.036826), -1.948401),
    },
}


def _params(module):
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]:
    path = path[:-1] if isinstance(path[-1], jax.tree_util.GetAttrKey) else path  # .value
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    flat["/".join(keys)] = np.asarray(leaf, np.float32)
  return flat


def _check(name, params):
  expected = FLAX[name]
  assert sorted(params) == sorted(expected), f"{name}: parameter paths differ from Flax's"
  for path, (shape, first, total) in expected.items():
    got = params[path]
    assert got.shape == shape, f"{name}/{path}: shape {got.shape}, Flax {shape}"
    flat = got.ravel()
    if first == ZEROS:
      np.testing.assert_array_equal(flat, 0.0, err_msg=f"{name}/{path}")
    elif first == ONES:
      np.testing.assert_array_equal(flat, 1.0, err_msg=f"{name}/{path}")
    else:
      np.testing.assert_allclose(flat[:len(first)], first, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name}/{path}")
    np.testing.assert_allclose(flat.sum(), total, rtol=1e-5, atol=1e-5, err_msg=f"{name}/{path}")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_initial_parameters_equal_flax(name):
  _check(name, _params(LAYERS[name]()))


def test_every_recorded_layer_is_built():
  assert sorted(LAYERS) == sorted(FLAX)


@pytest.mark.parametrize("name", ["Linear", "MultiHeadAttention", "Embed", "LSTMCell"])
def test_initial_parameters_equal_flax_under_a_sharding_context(name):
  # Initialisation does not depend on the mesh: same numbers under use_sharding.
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(LAYERS[name])
  assert any(len(v.value.sharding.device_set) == 8 for _, v in nnx.state(model, nnx.Param).flat_state())
  _check(name, _params(model))


def test_stream_keys_equal_flax():
  rngs = nnx.Rngs(0, params=1, dropout=2)
  data = lambda k: jax.random.key_data(k).tolist()  # noqa: E731
  assert data(rngs()) == [1797259609, 2579123966]
  assert data(rngs.params()) == [507451445, 1853169794]
  assert data(rngs.dropout.fork()()) == [1674946514, 3241262372]


def test_dropout_mask_equals_flax():
  drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
  np.testing.assert_array_equal(drop(jnp.ones((8,))), [0, 0, 0, 0, 2, 0, 0, 2])
