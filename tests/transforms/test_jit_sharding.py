"""nnx.jit under use_sharding: derived shardings, kept across steps, donation."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import spmdnnx as nnx


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(32, 16, kernel_axes=("mlp", "embed"), rngs=rngs)
    self.calls = nnx.Variable(jnp.array(0))

  def __call__(self, x):
    self.calls += 1
    return self.down(jax.nn.relu(self.up(x)))


def make_step():
  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss
  return step


@pytest.fixture
def mesh():
  return nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))


def test_state_is_sharded_by_rules_and_stays_sharded(mesh):
  model = MLP(nnx.Rngs(0))            # built unsharded, outside any context
  optimizer = nnx.Optimizer(model, optax.adam(1e-2))
  step = make_step()
  x = jnp.ones((8, 16))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    losses = [float(step(model, optimizer, x)) for _ in range(3)]
  assert losses[2] < losses[0]
  assert model.up.kernel.value.sharding.spec == P("fsdp", "tensor")
  assert model.down.kernel.value.sharding.spec == P("tensor", "fsdp")
  assert model.up.bias.value.sharding.spec == P("tensor")
  mu = optimizer.opt_state[0]["mu"]["up"]["kernel"]
  assert mu.logical_axes == ("embed", "mlp")
  assert mu.value.sharding.spec == P("fsdp", "tensor")
  assert model.calls.value.sharding.spec == P()
  assert int(model.calls.value) == 3
  # The device-0 shard is 1/8 of the kernel.
  assert model.up.kernel.value.addressable_shards[0].data.shape == (4, 16)


def test_state_is_donated_inside_a_sharding_context(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2))
  step = make_step()
  x = jnp.ones((8, 16))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, x)
    before = model.up.kernel.value
    step(model, optimizer, x)
  assert before.is_deleted()
  assert not model.up.kernel.value.is_deleted()


def test_donate_state_false_keeps_old_buffers(mesh):
  model = MLP(nnx.Rngs(0))

  @nnx.jit(donate_state=False)
  def forward(model, x):
    return model(x)

  x = jnp.ones((8, 16))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    forward(model, x)
    before = model.up.kernel.value
    forward(model, x)
  assert not before.is_deleted()


def test_new_context_block_with_same_mesh_and_rules_reuses_the_plan(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2))
  step = make_step()
  x = jnp.ones((8, 16))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, x)
  plan = step._plan
  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, optimizer, x)
  assert step._plan is plan
  # Other rules give another plan (and other shardings).
  with nnx.use_sharding(mesh, "dp"):
    step(model, optimizer, x)
  assert step._plan is not plan
  assert model.up.kernel.value.sharding.is_fully_replicated


def test_unknown_logical_name_fails_naming_the_path(mesh):
  class Odd(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((8, 4)), logical_axes=("nonsense", None))

  @nnx.jit
  def f(m):
    return m.w.value.sum()

  with nnx.use_sharding(mesh, "fsdp_tp"):
    with pytest.raises(nnx.errors.AxisRulesError, match=r"w.*nonsense"):
      f(Odd())


def test_in_shardings_for_a_module_argument_lays_out_its_state(mesh):
  from jax.sharding import NamedSharding
  replicated = NamedSharding(mesh, P())

  @nnx.jit(in_shardings=(replicated, None))
  def f(model, x):
    return model(x)

  model = MLP(nnx.Rngs(0))
  f(model, jnp.ones((8, 16)))
  for _, v in nnx.state(model).flat_state():
    assert v.value.sharding.is_equivalent_to(replicated, v.value.ndim)


def test_in_shardings_for_a_module_argument_under_use_sharding_is_an_error(mesh):
  from jax.sharding import NamedSharding

  @nnx.jit(in_shardings=(NamedSharding(mesh, P()), None))
  def f(model, x):
    return model(x)

  with nnx.use_sharding(mesh, "fsdp_tp"):
    with pytest.raises(nnx.errors.TransformError,
                       match=r"in_shardings gives a sharding for argument\(s\) \[0\], which "
                       r"hold graph objects, inside a use_sharding context"):
      f(MLP(nnx.Rngs(0)), jnp.ones((8, 16)))


def test_in_shardings_for_plain_arguments_are_applied(mesh):
  from jax.sharding import NamedSharding
  batch_sharding = NamedSharding(mesh, P("fsdp"))

  @nnx.jit(in_shardings=(None, batch_sharding), out_shardings=batch_sharding)
  def f(model, x):
    return model(x)

  x = jax.device_put(jnp.ones((8, 16)), batch_sharding)
  y = f(MLP(nnx.Rngs(0)), x)
  assert y.sharding.spec == P("fsdp")
