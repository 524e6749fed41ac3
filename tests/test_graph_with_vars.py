"""nnx.with_vars: copies of a graph's Variables with new hijax/ref/mutable metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


def test_with_vars_copies_only_the_variables_that_change():
  m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  out = nnx.with_vars(m, hijax=True, only=nnx.PathContains("kernel"))
  assert out is not m and out.kernel is not m.kernel and out.bias is m.bias
  assert out.kernel.hijax and not m.kernel.hijax
  np.testing.assert_array_equal(out.kernel.value, m.kernel.value)
  same = nnx.with_vars(m, hijax=False)  # nothing differs: Variables shared
  assert same.kernel is m.kernel


def test_with_vars_on_a_state_for_plain_jax_grad():
  m = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(m)
  params = nnx.with_vars(params, hijax=False)
  assert isinstance(params, nnx.State)

  def loss(p):
    return nnx.merge(graphdef, p)(jnp.ones((1, 2))).sum()

  grads = jax.grad(loss)(params)
  np.testing.assert_allclose(grads["kernel"].value, jnp.ones((2, 1)))


def test_with_vars_refuses_a_shared_variable_unless_allowed():
  p = nnx.Param(jnp.ones(1))
  with pytest.raises(errors.GraphError, match="Found duplicate at paths") as info:
    nnx.with_vars({"a": p, "b": p}, hijax=True)
  assert info.value.paths == [("a",), ("b",)]
  out = nnx.with_vars({"a": p, "b": p}, hijax=True, allow_duplicates=True)
  assert out["a"].hijax and out["a"] is out["b"] and out["a"] is not p


def test_with_vars_ref_true_is_refused():
  with pytest.raises(errors.MetadataError, match="ref=True"):
    nnx.with_vars(nnx.Param(jnp.ones(1)), ref=True)
