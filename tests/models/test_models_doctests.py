"""Runs the `>>>` examples in the spmdnnx.models docstrings."""

import doctest
import importlib

import pytest

MODULES = ["spmdnnx.models._cache", "spmdnnx.models._config", "spmdnnx.models._flops",
           "spmdnnx.models._generate", "spmdnnx.models._layers", "spmdnnx.models._llama",
           "spmdnnx.models._loss", "spmdnnx.models._mlp", "spmdnnx.models._presets",
           "spmdnnx.models._regressor", "spmdnnx.models._rope"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
