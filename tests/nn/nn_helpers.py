"""Helpers for the nn tests: running layers under jax.jit with the functional API."""

import jax
import numpy as np

import spmdnnx as nnx


def jit_apply(model, fn, *args):
  """Runs ``fn(model, *args)`` inside jax.jit; writes state changes back."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, *args):
    m = nnx.merge(graphdef, state)
    out = fn(m, *args)
    return out, nnx.split(m)[1]

  out, new_state = run(state, *args)
  nnx.update(model, new_state)
  return out


def param_grads(model, loss):
  """jax.grad of ``loss(model)`` over the model's Params (a State)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(params):
    return loss(nnx.merge(graphdef, params, rest))

  return jax.jit(jax.grad(f))(params)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol)
