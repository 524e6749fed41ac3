"""Runs the `>>>` examples in the nn and optim docstrings."""

import doctest
import importlib

import pytest

MODULES = ["spmdnnx.nn.activations", "spmdnnx.nn._attention", "spmdnnx.nn._conv",
           "spmdnnx.nn._dropout", "spmdnnx.nn._embed", "spmdnnx.nn.initializers",
           "spmdnnx.nn._linear", "spmdnnx.nn._normalization", "spmdnnx.nn._pooling",
           "spmdnnx.nn._recurrent", "spmdnnx.nn._sequential", "spmdnnx._optim"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
