"""Runs the `>>>` examples of the runtime's modules."""

import doctest
import importlib

import jax
import pytest

MODULES = ["spmdnnx.train._data", "spmdnnx.train._peaks", "spmdnnx.train._metrics",
           "spmdnnx.train._config", "spmdnnx.train._step"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
