"""Optimizer: training, state axes, optax combinators, jit propagation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx._optim import Optimizer


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(2, 16, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.l2 = nnx.Linear(16, 1, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


class CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(nnx.avg_pool(x, (4, 4), strides=(4, 4)).reshape(x.shape[0], -1))


def _regression_data():
  x = jax.random.uniform(jax.random.key(0), (64, 2), minval=-1, maxval=1)
  return x, jnp.sin(3 * x[:, :1]) * x[:, 1:]


def _mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def test_trains_mlp_with_functional_jit():
  model = MLP(nnx.Rngs(0))
  opt = Optimizer(model, optax.adamw(1e-2, weight_decay=1e-4), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  x, y = _regression_data()

  @jax.jit
  def step(state, x, y):
    model, opt = nnx.merge(graphdef, state)
    g, params, rest = nnx.split(model, nnx.Param, ...)
    loss, grads = jax.value_and_grad(lambda p: _mse(nnx.merge(g, p, rest), x, y))(params)
    opt.update(model, grads)
    return loss, nnx.split((model, opt))[1]

  first = None
  for _ in range(150):
    loss, state = step(state, x, y)
    first = float(loss) if first is None else first
  nnx.update((model, opt), state)
  assert float(_mse(model, x, y)) < 0.3 * first
  assert int(opt.step.value) == 150


def test_trains_cnn_with_nnx_transforms_and_schedule():
  model = CNN(nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 5, 60)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt = Optimizer(model, tx)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  labels = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(jnp.int32)

  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @nnx.jit
  def train_step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(train_step(model, opt)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0]
  assert int(opt.step.value) == 60
  assert float(jnp.abs(model.bn.mean.value).sum()) > 0   # BatchStats propagated too


def test_state_carries_parameter_axes():
  model = MLP(nnx.Rngs(0))
  opt = Optimizer(model, optax.adam(1e-3))
  mu = opt.opt_state[0]["mu"]
  assert isinstance(mu["l1"]["kernel"], nnx.OptVariable)
  assert mu["l1"]["kernel"].logical_axes == ("embed", "mlp")
  assert mu["l1"]["bias"].logical_axes == ("mlp",)
  assert opt.opt_state[0]["nu"]["l2"]["kernel"].logical_axes == ("mlp", "embed")
  count = opt.opt_state[0]["count"]
  assert isinstance(count, nnx.OptArrayState) and count.logical_axes is None
  assert isinstance(opt.step, nnx.OptState)
  opt_state = nnx.state(opt, nnx.OptState)
  assert len(opt_state.flat_state()) == 10   # step + count + 2 x 4 moments


def test_stacked_layers_axis_is_kept():
  @nnx.vmap
  def make(key):
    return nnx.Linear(3, 3, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(key))

  stack = make(jax.random.split(jax.random.key(0), 4))
  assert stack.kernel.logical_axes == ("layers", "embed", "mlp")
  opt = Optimizer(stack, optax.adam(1e-3))
  mu = opt.opt_state[0]["mu"]
  assert mu["kernel"].logical_axes == ("layers", "embed", "mlp")
  assert mu["kernel"].shape == (4, 3, 3)
  assert mu["bias"].logical_axes == ("layers", "mlp")


def test_optimizer_axes_override():
  model = MLP(nnx.Rngs(0))
  renamed = Optimizer(model, optax.adam(1e-3), optimizer_axes={"embed": "opt_embed"})
  assert renamed.opt_state[0]["mu"]["l1"]["kernel"].logical_axes == ("opt_embed", "mlp")
  assert model.l1.kernel.logical_axes == ("embed", "mlp")
  plain = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  zero = Optimizer(plain, optax.adam(1e-3), optimizer_axes={None: "zero"})
  assert zero.opt_state[0]["mu"]["kernel"].logical_axes == ("zero", "zero")
  fn = Optimizer(model, optax.sgd(1e-3, momentum=0.9),
                 optimizer_axes=lambda path, axes: ("zero",) + tuple(axes[1:]))
  assert fn.opt_state[0]["trace"]["l2"]["bias"].logical_axes == ("zero",)


def test_update_forms_are_equivalent_and_grads_may_be_superset():
  x, y = _regression_data()
  a, b, t = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
  opt_a, opt_t = Optimizer(a, optax.adam(1e-2)), Optimizer(t, optax.adam(1e-2))
  opt_b = nnx.ModelAndOptimizer(b, optax.adam(1e-2))
  opt_a.update(a, nnx.grad(_mse)(a, x, y))
  opt_b.update(nnx.grad(_mse)(b, x, y))
  # A gradient shaped like the model (tree-mode grad, jax.grad of a Module).
  tree_grads = nnx.grad(_mse, graph=False)(t, x, y)
  assert isinstance(tree_grads, MLP)
  opt_t.update(t, tree_grads)
  np.testing.assert_allclose(a.l1.kernel.value, b.l1.kernel.value)
  np.testing.assert_allclose(a.l1.kernel.value, t.l1.kernel.value)
  assert opt_a.model is a and opt_b.model is b
  # Only the first layer is optimized; gradients of the others are ignored.
  c = MLP(nnx.Rngs(0))
  opt_c = Optimizer(c, optax.sgd(1.0), wrt=nnx.All(nnx.Param, nnx.PathContains("l1")))
  before = np.asarray(c.l2.kernel.value)
  opt_c.update(c, nnx.grad(_mse)(c, x, y))
  np.testing.assert_array_equal(c.l2.kernel.value, before)
  assert not np.allclose(c.l1.kernel.value, a.l1.kernel.value)


def test_masked_weight_decay_and_multi_transform():
  model = MLP(nnx.Rngs(0))
  decay_kernels = optax.masked(optax.add_decayed_weights(0.5),
                               lambda p: jax.tree.map(lambda v: v.ndim > 1, p))
  opt = Optimizer(model, optax.chain(decay_kernels, optax.sgd(1.0)))
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  bias, kernel = np.asarray(model.l1.bias.value), np.asarray(model.l1.kernel.value)
  opt.update(model, zeros)
  np.testing.assert_allclose(model.l1.kernel.value, 0.5 * kernel, rtol=1e-6)
  np.testing.assert_array_equal(model.l1.bias.value, bias)

  frozen = MLP(nnx.Rngs(1))
  # Optax sees a State of plain arrays: key paths end at the parameter name.
  labels = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if path[0].key == "l1" else "train", p)
  tx = optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.adam(0.1)},
                             labels)
  opt = Optimizer(frozen, tx)
  l1, l2 = np.asarray(frozen.l1.kernel.value), np.asarray(frozen.l2.kernel.value)
  x, y = _regression_data()
  opt.update(frozen, nnx.grad(_mse)(frozen, x, y))
  np.testing.assert_array_equal(frozen.l1.kernel.value, l1)
  assert not np.allclose(frozen.l2.kernel.value, l2)


def test_bf16_params_keep_their_dtype():
  model = nnx.Linear(2, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  opt = Optimizer(model, optax.adam(1e-2))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  assert model.kernel.dtype == jnp.bfloat16


def test_errors():
  model = MLP(nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match=r"wrt=.*BatchStat.* selects no Variables of the MLP"):
    Optimizer(model, optax.sgd(1.0), wrt=nnx.BatchStat)
  opt = Optimizer(model, optax.sgd(1.0))
  grads = nnx.state(model, nnx.Param)
  with pytest.raises(errors.GraphError, match=r"the Linear passed does not have the parameters "
                     r"this optimizer was built for .*missing l1/bias, .*; not in the optimizer "
                     r"state bias, kernel") as e:
    opt.update(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), grads)
  assert "l2/kernel" in e.value.paths and "kernel" in e.value.paths
  with pytest.raises(errors.ConfigError, match=r"takes \(model, grads\) or \(grads,\), got 3"):
    opt.update(model, grads, grads)
  with pytest.raises(errors.ConfigError, match=r"the model must be a Module .*got State: call "
                                               r"optimizer.update\(model, grads\)"):
    opt.update(grads, grads)
  partial = nnx.state(model.l1, nnx.Param)
  with pytest.raises(errors.GraphError, match=r"grads have no entry for 4 optimized Variable\(s\): "
                                              r"l1/bias, l1/kernel, l2/bias, l2/kernel"):
    opt.update(model, partial)
  bad = jax.tree.map(lambda v: v, grads)
  bad["l1"]["bias"] = jnp.zeros((3,))
  with pytest.raises(errors.ShapeError, match=r"l1/bias \(param \(16,\), grad \(3,\)\)") as e:
    opt.update(model, bad)
  assert e.value.paths == ["l1/bias"] and e.value.shapes == [((16,), (3,))]
  with pytest.raises(errors.GraphError, match=r"grads must be a State \(e.g. from nnx.grad\) or "
                                              r"an object shaped like the model, got list") as e:
    opt.update(model, [1.0])
  assert e.value.argument == "grads"
  with pytest.raises(errors.GraphError, match="grads have no entry") as e:
    opt.update(model, partial)
  assert e.value.paths == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]


def test_optimizer_steps_a_model_rebuilt_by_merge():
  """Flax's functional style: a model merged from a State is stepped, not optimizer.model."""
  x, y = _regression_data()
  model = MLP(nnx.Rngs(0))
  opt = Optimizer(model, optax.adam(1e-2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  before = np.asarray(params["l1"]["kernel"].value)
  rebuilt = nnx.merge(graphdef, params, rest)
  assert rebuilt is not model
  opt.update(rebuilt, nnx.grad(_mse)(rebuilt, x, y))
  assert not np.allclose(rebuilt.l1.kernel.value, before)
  # merge reuses the State's Variables, so the State sees the step too.
  np.testing.assert_array_equal(params["l1"]["kernel"].value, rebuilt.l1.kernel.value)
  assert int(opt.step.value) == 1

