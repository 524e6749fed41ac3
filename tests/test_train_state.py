"""TrainState (functional) and ModelAndOptimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Net(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, x, train):
    return self.bn(self.linear(x), use_running_average=not train)


class WithStats(nnx.TrainState):
  batch_stats: nnx.State


def _state():
  graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
  return WithStats.create(graphdef, params=params, tx=optax.sgd(0.5), batch_stats=stats)


def test_subclass_fields_are_pytree_children_and_tx_is_static():
  ts = _state()
  leaves = jax.tree.leaves(ts)
  n_params = len(jax.tree.leaves(ts.params))
  n_stats = len(jax.tree.leaves(ts.batch_stats))
  assert len(leaves) == n_params + n_stats + 1  # + step; sgd's state has no leaves
  again = jax.tree.map(lambda x: x, ts)
  assert again.tx is ts.tx and isinstance(again, WithStats)


def test_apply_gradients_is_one_sgd_step():
  ts = _state()
  grads = jax.tree.map(jnp.ones_like, ts.params)
  new = ts.apply_gradients(grads)
  assert int(new.step) == 1 and int(ts.step) == 0
  np.testing.assert_allclose(new.params["linear"]["kernel"].value,
                             ts.params["linear"]["kernel"].value - 0.5)


def test_apply_by_field_name_runs_the_model_and_updates_stats():
  ts = _state()
  y, (_, new_state) = ts.apply("params", "batch_stats")(jnp.ones((4, 2)), train=True)
  assert y.shape == (4, 3)
  assert not np.allclose(new_state["bn"]["mean"].value, ts.batch_stats["bn"]["mean"].value)


def test_apply_gradients_under_jax_jit():
  ts = _state()

  @jax.jit
  def step(ts, x):
    def loss(params):
      y, _ = ts.graphdef.apply(params, ts.batch_stats)(x, train=False)
      return (y ** 2).mean()
    return ts.apply_gradients(jax.grad(loss)(ts.params))

  new = step(ts, jnp.ones((2, 2)))
  assert int(new.step) == 1


def test_apply_with_a_non_state_field_is_refused():
  ts = _state()
  with pytest.raises(errors.ArgumentError, match="field 'step' must hold a State"):
    ts.apply("step")


def test_model_and_optimizer_update_takes_grads_only_and_returns_updates():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  state = nnx.ModelAndOptimizer(model, optax.sgd(0.1))
  before = model.kernel.value
  grads = nnx.grad(lambda m: (m(jnp.ones((1, 2))) ** 2).sum())(model)
  updates = state.update(grads)
  np.testing.assert_allclose(model.kernel.value, before + updates["kernel"])
  assert int(state.step.value) == 1


def test_optimizer_update_returns_updates_shaped_like_params():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  updates = opt.update(model, grads)
  assert jax.tree.map(jnp.shape, updates) == {"bias": (3,), "kernel": (2, 3)} or \
      jax.tree.map(jnp.shape, dict(updates)) == {"bias": (3,), "kernel": (2, 3)}


def test_lbfgs_line_search_through_update_kwargs():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.lbfgs(), wrt=nnx.Param)
  graphdef = nnx.graphdef(model)
  x, y = jnp.ones((4, 2)), jnp.full((4, 1), 3.0)

  def loss(m):
    return ((m(x) - y) ** 2).mean()

  def loss_of_params(params):
    return loss(nnx.merge(graphdef, params))

  first = loss(model)
  for _ in range(3):
    value = loss(model)
    grads = nnx.grad(loss)(model)
    opt.update(model, grads, grad=grads, value=value, value_fn=loss_of_params)
  assert float(loss(model)) < 0.1 * float(first)
