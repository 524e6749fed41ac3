"""Arrays deleted by a donating nnx.jit step: a clear error where they come back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=rngs)

  def __call__(self, x):
    return self.up(x)


@pytest.fixture
def mesh():
  return nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))


def make_step():
  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss
  return step


X = jnp.ones((8, 16))
MESSAGE = (r"holds an array that was deleted\. Under `use_sharding`, nnx\.jit donates the "
           r"state of its graph-object arguments.*Keep a copy before the step \(`jnp\.copy\(v\.value\)` or "
           r"`jax\.device_get\(v\.value\)`\), or pass `donate_state=False`")


def trained(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)
  step = make_step()
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)
  return model, optimizer, step


def test_kept_array_passed_to_another_jit(mesh):
  model, optimizer, step = trained(mesh)
  kept = model.up.kernel.value           # read before the step ...
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)            # ... which donates it
    norm = nnx.jit(lambda w: jnp.sum(w ** 2))
    with pytest.raises(errors.DonatedArrayError, match=r"argument 0 " + MESSAGE) as info:
      norm(kept)
  assert info.value.arguments == ["argument 0"]
  assert isinstance(info.value, RuntimeError)   # still what JAX users catch


def test_variable_assigned_a_deleted_array_names_its_path(mesh):
  model, optimizer, step = trained(mesh)
  ema = nnx.Module()
  ema.kernel = nnx.Param(model.up.kernel.value)   # shares the buffer, no copy
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)
    blend = nnx.jit(lambda e, m: e.kernel.value * 0.9 + m.up.kernel.value * 0.1)
    with pytest.raises(errors.DonatedArrayError, match=r"kernel \(in argument 0\) " + MESSAGE) as info:
      blend(ema, model)
  assert info.value.paths == ["kernel (in argument 0)"]


def test_stale_state_restored_into_the_model(mesh):
  model, optimizer, step = trained(mesh)
  # nnx.state holds the live Variables (Flax 0.12); a tree map gives copies
  # of them that keep the same (soon donated) buffers.
  snapshot = jax.tree.map(lambda x: x, nnx.state(model))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)
    nnx.update(model, snapshot)          # puts the donated arrays back
    with pytest.raises(errors.DonatedArrayError, match=r"jit\(make_step.<locals>.step\): up/bias \(in argument 0\), "
                       r"up/kernel \(in argument 0\) " + MESSAGE):
      step(model, optimizer, X)


def test_stale_gradients_given_to_the_optimizer(mesh):
  model, optimizer, step = trained(mesh)
  grads = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))  # same buffers
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)
    apply = nnx.jit(lambda opt, m, g: opt.update(m, g))
    with pytest.raises(errors.DonatedArrayError,
                       match=r"argument 2\['up'\]\['bias'\], argument 2\['up'\]\['kernel'\] "
                       + MESSAGE):
      apply(optimizer, model, grads)


def test_stale_value_on_a_planned_fast_path_is_caught_before_the_call(mesh):
  # The plan is reused (no re-walk): XLA:CPU would crash on the deleted buffer,
  # so the check runs before the compiled step.
  model, optimizer, step = trained(mesh)
  ema = nnx.Module()
  ema.kernel = nnx.Param(jnp.zeros((16, 32)))
  blend = nnx.jit(lambda e, m: e.kernel.value * 0.9 + m.up.kernel.value * 0.1,
                  donate_state=False)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    blend(ema, model)
    plan = blend._plan
    ema.kernel.value = model.up.kernel.value    # a value change: the plan stays valid
    step(model, optimizer, X)                   # donates that array
    with pytest.raises(errors.DonatedArrayError, match=r"kernel \(in argument 0\) " + MESSAGE):
      blend(ema, model)
    assert blend._plan is plan


def test_copies_kept_before_the_step_stay_valid(mesh):
  model, optimizer, step = trained(mesh)
  copy = jnp.copy(model.up.kernel.value)
  host = jax.device_get(model.up.kernel.value)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)
  np.testing.assert_allclose(copy, host)


def test_donate_state_false_keeps_the_arrays(mesh):
  model = MLP(nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x), donate_state=False)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    forward(model, X)
    kept = model.up.kernel.value
    forward(model, X)
  assert not kept.is_deleted()


def test_other_runtime_errors_pass_through():
  @nnx.jit
  def boom(x):
    return jax.pure_callback(_raise, jax.ShapeDtypeStruct((), jnp.float32), x)

  with pytest.raises(Exception, match="boom from the host") as info:
    jax.block_until_ready(boom(jnp.ones(())))
  assert not isinstance(info.value, errors.DonatedArrayError)


def _raise(x):
  raise RuntimeError("boom from the host")


def test_deleted_array_inside_a_batch_dict(mesh):
  model, optimizer, step = trained(mesh)
  kept = model.up.kernel.value
  f = nnx.jit(lambda m, batch: m(batch["x"]).sum() + batch["w"].sum())
  with nnx.use_sharding(mesh, "fsdp_tp"):
    f(model, {"x": X, "w": jnp.ones(2)})          # plan made, then reused below
    step(model, optimizer, X)
    with pytest.raises(errors.DonatedArrayError, match=r"argument 1 " + MESSAGE):
      f(model, {"x": X, "w": kept})


def test_error_builder_for_other_layers():
  # For code below the transforms (e.g. Variable arithmetic) to raise the same error.
  err = errors.DonatedArrayError.build("Param.__add__", "this Param", paths=["w"])
  assert err.paths == ["w"]
  with pytest.raises(errors.DonatedArrayError, match=r"Param\.__add__: this Param " + MESSAGE):
    raise err


def test_eager_variable_arithmetic_on_a_donated_array(mesh):
  model, optimizer, step = trained(mesh)
  ema = nnx.Module()
  ema.kernel = nnx.Param(model.up.kernel.value)   # shares the buffer
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)
  with pytest.raises(errors.DonatedArrayError, match=r"Param mul: this Variable " + MESSAGE):
    ema.kernel * 0.9
  with pytest.raises(errors.DonatedArrayError, match=r"Param add: this Variable " + MESSAGE):
    ema.kernel += 1.0
  with pytest.raises(errors.DonatedArrayError, match=r"Param neg: this Variable " + MESSAGE):
    -ema.kernel


def test_eager_optimizer_update_with_stale_gradients(mesh):
  model, optimizer, step = trained(mesh)
  grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2))(model)
  kept = nnx.State({"up": {"kernel": nnx.Param(grads["up"]["kernel"].value),
                           "bias": nnx.Param(model.up.bias.value)}})   # aliases the bias
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, X)                  # donates the model's arrays
  with pytest.raises(errors.DonatedArrayError,
                     match=r"Optimizer\.update: the model, the gradients or the optimizer "
                           r"state " + MESSAGE):
    optimizer.update(model, kept)
