"""nnx.jit under use_sharding: every argument position gets shardings and donation.

Also: graph objects created inside (returned or attached) come out laid out by
their logical axes, and a plan is one path whatever the positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spmdnnx as nnx


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(32, 16, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


@pytest.fixture
def mesh():
  return nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))


def expected(mesh, *spec):
  return NamedSharding(mesh, P(*spec))


def assert_laid_out(model, mesh):
  assert model.up.kernel.value.sharding == expected(mesh, "fsdp", "tensor")
  assert model.down.kernel.value.sharding == expected(mesh, "tensor", "fsdp")
  assert model.up.bias.value.sharding == expected(mesh, "tensor")


def loss_step(model, x):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads))
  return loss


X = jnp.ones((8, 16))


@pytest.mark.parametrize("position", ["keyword", "list", "tuple", "dict"])
def test_every_position_is_sharded_and_donated(mesh, position):
  model = MLP(nnx.Rngs(0))
  calls = {
      "keyword": (nnx.jit(lambda x, *, model: loss_step(model, x)), lambda m: ((X,), {"model": m})),
      "list": (nnx.jit(lambda ms, x: loss_step(ms[0], x)), lambda m: (([m], X), {})),
      "tuple": (nnx.jit(lambda ms, x: loss_step(ms[0], x)), lambda m: (((m, 1.0), X), {})),
      "dict": (nnx.jit(lambda d: loss_step(d["m"], d["x"])), lambda m: (({"m": m, "x": X},), {})),
  }
  step, make_args = calls[position]
  with nnx.use_sharding(mesh, "fsdp_tp"):
    args, kwargs = make_args(model)
    first = float(step(*args, **kwargs))
    before = model.up.kernel.value
    args, kwargs = make_args(model)
    second = float(step(*args, **kwargs))
  assert second < first
  assert_laid_out(model, mesh)
  assert before.is_deleted()  # donated
  assert not model.up.kernel.value.is_deleted()


def test_module_with_raw_array_attribute_is_sharded_and_donated(mesh):
  model = MLP(nnx.Rngs(0))
  model.buf = jnp.zeros((8, 4))   # a raw array, no logical axes: replicated

  @nnx.jit
  def step(m, x):
    m.buf = m.buf + 1.0
    return loss_step(m, x)

  with nnx.use_sharding(mesh, "fsdp_tp"):
    step(model, X)
    before = model.buf
    step(model, X)
  assert_laid_out(model, mesh)
  assert model.buf.sharding == expected(mesh)
  np.testing.assert_array_equal(model.buf, np.full((8, 4), 2.0))
  assert before.is_deleted()


def test_raw_array_step_keeps_its_plan(mesh):
  model = MLP(nnx.Rngs(0))
  model.buf = jnp.zeros(2)

  @nnx.jit
  def step(m):
    m.buf = m.buf + 1.0

  step(model)
  plan = step._plan
  for _ in range(3):
    step(model)
  assert step._plan is plan   # writing the raw array back does not invalidate the plan
  np.testing.assert_array_equal(model.buf, [4.0, 4.0])


def test_module_created_inside_jit_is_laid_out(mesh):
  make = nnx.jit(lambda: nnx.Linear(4, 8, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0)))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    layer = make()
  assert layer.kernel.value.sharding == expected(mesh, "fsdp", "tensor")
  assert layer.bias.value.sharding == expected(mesh, "tensor")
  eager = nnx.Linear(4, 8, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer.kernel.value, eager.kernel.value)


def test_new_module_next_to_a_sharded_argument(mesh):
  model = MLP(nnx.Rngs(0))

  @nnx.jit
  def fork(m):
    return m, nnx.Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(1))

  with nnx.use_sharding(mesh, "fsdp_tp"):
    same, new = fork(model)
  assert same is model
  assert_laid_out(model, mesh)
  assert new.kernel.value.sharding == expected(mesh, "fsdp", "tensor")


def test_submodule_attached_inside_jit_is_laid_out(mesh):
  model = MLP(nnx.Rngs(0))

  @nnx.jit
  def grow(m):
    m.extra = nnx.Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(2))

  with nnx.use_sharding(mesh, "fsdp_tp"):
    grow(model)
    assert tuple(model.extra.kernel.value.sharding.spec) == ("fsdp", "tensor")
    grow(model)   # next plan: state moved to the exact shardings
  assert model.extra.kernel.value.sharding == expected(mesh, "fsdp", "tensor")
  assert_laid_out(model, mesh)


def test_optimizer_in_a_dict_with_model_keyword(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(state, *, x):
    m, opt = state["model"], state["opt"]
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)
    opt.update(m, grads)
    return loss

  with nnx.use_sharding(mesh, "fsdp_tp"):
    losses = [float(step({"model": model, "opt": optimizer}, x=X)) for _ in range(3)]
  assert losses[2] < losses[0]
  assert_laid_out(model, mesh)
  mu = optimizer.opt_state[0]["mu"]["up"]["kernel"]
  assert mu.value.sharding == expected(mesh, "fsdp", "tensor")
  assert optimizer.model is model


def test_nested_positions_reuse_the_plan():
  traces = []
  c = nnx.Module()
  c.n = nnx.Variable(jnp.array(0))

  @nnx.jit
  def f(pair, *, scale):
    traces.append(1)
    pair[0].n += 1
    return pair[1] * scale

  for _ in range(3):
    f((c, jnp.ones(2)), scale=2.0)
  plan = f._plan
  f((c, jnp.ones(2)), scale=3.0)
  assert f._plan is plan and len(traces) == 1
  assert int(c.n.value) == 4
  other = nnx.Module()
  other.n = nnx.Variable(jnp.array(10))
  f((other, jnp.ones(2)), scale=1.0)   # another object in the same slot: another plan
  assert int(other.n.value) == 11 and int(c.n.value) == 4


def test_plain_container_then_node_in_same_position():
  seen = []

  @nnx.jit
  def f(items):
    seen.append(type(items[0]).__name__)
    if isinstance(items[0], nnx.Variable):
      items[0].value = items[0].value + 1
    return None

  f([jnp.zeros(2)])
  v = nnx.Variable(jnp.zeros(2))
  f([v])   # the plan made for a plain list must not swallow the Variable
  np.testing.assert_array_equal(v.value, [1.0, 1.0])


def test_in_shardings_for_a_container_of_modules_is_an_error(mesh):
  @nnx.jit(in_shardings=(NamedSharding(mesh, P()),))
  def f(ms):
    return ms[0](X)

  with pytest.raises(nnx.errors.TransformError,
                     match=r"in_shardings gives a sharding for argument\(s\) \[0\], which "
                     r"hold graph objects"):
    f([MLP(nnx.Rngs(0))])
