"""Runs the `>>>` examples in the core, transforms and runtime docstrings."""

import doctest
import importlib

import jax
import pytest

MODULES = [
    "spmdnnx.variables", "spmdnnx.filters", "spmdnnx.state", "spmdnnx.graph",
    "spmdnnx.module", "spmdnnx.rngs",
    "spmdnnx.transforms.jit", "spmdnnx.transforms.grad", "spmdnnx.transforms.vmap",
    "spmdnnx.transforms.scan", "spmdnnx.transforms.control", "spmdnnx.transforms.misc",
    "spmdnnx.transforms.axes", "spmdnnx.transforms.rngs",
    "spmdnnx.train.models", "spmdnnx.train.data",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  # Examples are written for JAX's default (standard) dtype promotion.
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
