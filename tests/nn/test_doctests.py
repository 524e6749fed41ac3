"""Runs the `>>>` examples in the nn and optim docstrings."""

import doctest
import importlib

import pytest

MODULES = ["spmdnnx.nn.activations", "spmdnnx.nn.attention", "spmdnnx.nn.conv",
           "spmdnnx.nn.dropout", "spmdnnx.nn.embed", "spmdnnx.nn.initializers",
           "spmdnnx.nn.linear", "spmdnnx.nn.normalization", "spmdnnx.nn.pooling",
           "spmdnnx.nn.recurrent", "spmdnnx.nn.sequential", "spmdnnx.optim"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
