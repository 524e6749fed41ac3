"""Runs the `>>>` examples of the parity transforms modules (guards, prefixes, partials,
autodiff, compile_misc)."""

import doctest
import importlib

import jax
import pytest

MODULES = [
    "spmdnnx._transforms.guards", "spmdnnx._transforms.prefixes",
    "spmdnnx._transforms.partials", "spmdnnx._transforms.autodiff",
    "spmdnnx._transforms.compile_misc",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
