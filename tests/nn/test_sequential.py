"""Sequential: chaining Modules and functions, tuple/dict passing, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import close, jit_apply

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx.nn import Dropout, Linear, Sequential, relu


def test_chains_modules_and_functions_under_jit():
  a, b = Linear(2, 3, rngs=nnx.Rngs(0)), Linear(3, 1, rngs=nnx.Rngs(1))
  model = Sequential(a, relu, b)
  x = jnp.array([[1.0, -2.0], [0.5, 0.5]])
  ref = np.maximum(np.asarray(a(x)), 0) @ np.asarray(b.kernel.value) + np.asarray(b.bias.value)
  close(jit_apply(model, lambda m, x: m(x), x), ref, 1e-5)
  assert nnx.state(model, nnx.Param)["layers"][0]["kernel"].shape == (2, 3)


def test_tuple_dict_outputs_and_rngs_forwarding():
  model = Sequential(lambda x: (x, x + 1), lambda a, b: {"a": a, "b": b},
                     lambda a, b: a * b)
  assert float(model(jnp.array(2.0))) == 6.0
  drop = Sequential(Dropout(0.5))
  y = drop(jnp.ones((50,)), rngs=nnx.Rngs(dropout=0))
  assert (np.asarray(y) == 0).any()


def test_errors():
  with pytest.raises(errors.ConfigError, match=r"Sequential: entry 1 is a int, not a callable"):
    Sequential(relu, 3)


def test_empty_sequential_is_the_identity():
  x = jnp.ones(1)
  iden = Sequential()
  assert iden(x) is x
  assert iden(1, 2) == (1, 2)
  assert iden() is None
  assert iden(k=2) == {"k": 2}
