"""Runs the >>> examples in every spmdnnx.spmd module."""

import doctest
import importlib

import pytest

MODULES = ["batch", "constrain", "context", "init", "mesh", "mesh_axes", "partition", "report",
           "resolve", "rules"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
  module = importlib.import_module(f"spmdnnx.spmd._{name}")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
