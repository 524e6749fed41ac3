"""Runs the `>>>` examples of the eager-sharding and abstract-model modules."""

import doctest
import importlib

import jax
import pytest


@pytest.mark.parametrize("name", ["spmdnnx._eager", "spmdnnx._abstract"])
def test_docstring_examples(name):
  module = importlib.import_module(name)
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
