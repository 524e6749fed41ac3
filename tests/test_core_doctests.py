"""Runs the `>>>` examples in the core, transforms and runtime docstrings."""

import doctest
import importlib

import jax
import pytest

MODULES = [
    "spmdnnx.errors", "spmdnnx._variables", "spmdnnx._filters", "spmdnnx._state", "spmdnnx._graph",
    "spmdnnx._module", "spmdnnx._rngs", "spmdnnx._modes", "spmdnnx._metrics", "spmdnnx._train_state", "spmdnnx._tabulate",
    "spmdnnx._transforms.jit", "spmdnnx._transforms.grad", "spmdnnx._transforms.vmap",
    "spmdnnx._transforms.scan", "spmdnnx._transforms.control", "spmdnnx._transforms.misc",
    "spmdnnx._transforms.axes", "spmdnnx._transforms.rngs", "spmdnnx._transforms.iteration_modes",
    "spmdnnx._transforms.guards", "spmdnnx._transforms.prefixes", "spmdnnx.extract",
    "spmdnnx._transforms.partials", "spmdnnx._transforms.autodiff",
    "spmdnnx._transforms.custom_vjp",
    "spmdnnx._transforms.compile_misc", "spmdnnx._transforms.jit_plan", "spmdnnx._eager",
    "spmdnnx._transforms.shmap",
    "spmdnnx._abstract",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  # Examples are written for JAX's default (standard) dtype promotion.
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
