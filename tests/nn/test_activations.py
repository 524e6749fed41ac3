"""Activations, PReLU and initializers."""

import jax
import jax.numpy as jnp
import numpy as np
from nn_helpers import close, param_grads

import spmdnnx as nnx
from spmdnnx import nn


def test_activations_match_numpy():
  x = np.linspace(-3, 3, 7)
  close(nn.relu(jnp.asarray(x)), np.maximum(x, 0))
  close(nn.sigmoid(jnp.asarray(x)), 1 / (1 + np.exp(-x)), 1e-6)
  close(nn.silu(jnp.asarray(x)), x / (1 + np.exp(-x)), 1e-5)
  assert nn.swish is nn.silu
  close(nn.tanh(jnp.asarray(x)), np.tanh(x), 1e-6)
  close(nn.softmax(jnp.asarray(x)), np.exp(x) / np.exp(x).sum(), 1e-6)
  close(nn.log_softmax(jnp.asarray(x)), x - np.log(np.exp(x).sum()), 1e-5)
  close(nn.gelu(jnp.asarray(x), approximate=False),
        0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2))), 1e-5)


def test_prelu_forward_and_grad():
  layer = nn.PReLU(0.25)
  x = jnp.array([-2.0, 3.0])
  close(layer(x), [-0.5, 3.0])
  close(param_grads(layer, lambda m: m(x).sum())["negative_slope"].value, -2.0)


def test_initializers():
  key = jax.random.key(0)
  assert nn.initializers.zeros_init()(key, (2,)).tolist() == [0.0, 0.0]
  assert nn.initializers.ones_init()(key, (2,), jnp.bfloat16).dtype == jnp.bfloat16
  w = nn.initializers.lecun_normal()(key, (256, 64))
  assert abs(float(w.std()) - 1 / 16) < 0.01
  w = nn.initializers.xavier_uniform()(key, (64, 64))
  assert float(jnp.abs(w).max()) <= np.sqrt(6 / 128) + 1e-6
  assert nn.initializers.constant(3.0)(key, (1,)).tolist() == [3.0]
  e = nn.initializers.default_embed_init()(key, (512, 8))
  assert abs(float(e.std()) - 1 / np.sqrt(8)) < 0.03   # variance 1 / features
