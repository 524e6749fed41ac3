"""Tests for `Stack` (scan over vmap-stacked layers) and stacked-state conversion."""

import doctest
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import spmd
from spmdnnx import _stack as stack_lib
from spmdnnx import _stack_convert as stack_convert
from spmdnnx.nn import BatchNorm, Dropout, Linear
from spmdnnx._optim import Optimizer
from spmdnnx._stack import Stack
from spmdnnx._stack_convert import stack_states, unstack_state

D = 8


class MLPBlock(nnx.Module):
  """Residual MLP block: x + down(gelu(up(x)))."""

  def __init__(self, rngs, *, d=D, hidden=2 * D):
    self.up = Linear(d, hidden, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(hidden, d, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    h = nnx.checkpoint_name(jax.nn.gelu(self.up(x)), "hidden")
    return x + self.down(h)


class Deep(nnx.Module):
  """The unrolled reference: a list of independent blocks applied in order."""

  def __init__(self, blocks):
    self.blocks = list(blocks)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def flat(state):
  return {p: v for p, v in state.flat_state()}


def x_input(batch=4, d=D, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, d))


# --- construction ------------------------------------------------------------------


def test_stacked_axis_in_metadata_and_shapes():
  stack = Stack(MLPBlock, 3, rngs=nnx.Rngs(0))
  assert stack.num_layers == 3
  assert stack.block.up.kernel.shape == (3, D, 2 * D)
  assert stack.block.up.kernel.logical_axes == ("layers", "embed", "mlp")
  assert stack.block.up.bias.logical_axes == ("layers", "mlp")
  assert stack.block.down.kernel.logical_axes == ("layers", "mlp", "embed")


def test_each_layer_initialised_with_distinct_keys():
  rngs = nnx.Rngs(0)
  stack = Stack(MLPBlock, 4, rngs=rngs)
  kernels = np.asarray(stack.block.up.kernel.value)
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.allclose(kernels[i], kernels[j]), (i, j)
  # The Rngs advanced: a second stack from the same Rngs differs too.
  again = Stack(MLPBlock, 4, rngs=rngs)
  assert not np.allclose(again.block.up.kernel.value, kernels)
  # The same seed reproduces the same stack.
  same = Stack(MLPBlock, 4, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(same.block.up.kernel.value, kernels)


def test_custom_stack_axis_name():
  stack = Stack(MLPBlock, 2, rngs=nnx.Rngs(0), stack_axis="depth")
  assert stack.block.up.kernel.logical_axes == ("depth", "embed", "mlp")
  y = stack(x_input())
  blocks = stack.to_blocks()
  assert blocks[0].up.kernel.logical_axes == ("embed", "mlp")
  close(y, Deep(blocks)(x_input()))


# --- application -------------------------------------------------------------------


def test_output_and_grads_equal_unrolled_loop():
  stack = Stack(MLPBlock, 4, rngs=nnx.Rngs(0))
  deep = Deep(stack.to_blocks())
  x = x_input()
  close(stack(x), deep(x))

  def loss(model, x):
    return jnp.sum(model(x) ** 2)

  g_stack = nnx.grad(loss)(stack, x)
  g_deep = nnx.grad(loss)(deep, x)
  expected = stack_states(g_deep["blocks"])
  got, want = flat(g_stack["block"]), flat(expected)
  assert got.keys() == want.keys()
  for path in got:
    close(got[path].value, want[path].value)
  # Gradients with respect to the input agree too.
  close(jax.grad(lambda x: loss(stack, x))(x), jax.grad(lambda x: loss(deep, x))(x))


def test_under_jit_and_jax_jit_functional_api():
  stack = Stack(MLPBlock, 3, rngs=nnx.Rngs(1))
  x = x_input()
  eager = stack(x)
  close(nnx.jit(lambda m, x: m(x))(stack, x), eager)
  graphdef, state = nnx.split(stack)
  close(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), eager)


class BiasBlock(nnx.Module):
  """Takes a per-layer bias, a broadcast scale; returns (carry, per-layer output)."""

  def __init__(self, rngs):
    self.lin = Linear(D, D, rngs=rngs)

  def __call__(self, x, bias, *, scale, double=False):
    y = jnp.tanh(self.lin(x)) * scale + bias
    if double:
      y = 2 * y
    return y, {"mean": jnp.mean(y), "sq": y * y}


def test_per_layer_inputs_outputs_and_broadcast_kwargs():
  stack = Stack(BiasBlock, 3, rngs=nnx.Rngs(0))
  x = x_input()
  biases = jnp.arange(3.0)[:, None] * jnp.ones((3, D))
  scale = jnp.array(0.5)
  carry, ys = stack(x, biases, scale=scale, double=True)
  assert ys["mean"].shape == (3,) and ys["sq"].shape == (3, 4, D)
  ref = x
  for i, block in enumerate(stack.to_blocks()):
    ref, y = block(ref, biases[i], scale=scale, double=True)
    close(ys["mean"][i], y["mean"])
    close(ys["sq"][i], y["sq"])
  close(carry, ref)


class DropBlock(nnx.Module):

  def __init__(self, rngs):
    self.drop = Dropout(0.5, rngs=rngs)

  def __call__(self, x, *, rngs=None):
    mask = self.drop(jnp.ones((64,)), rngs=rngs)
    return x, mask


def _assert_rows_differ(masks):
  masks = np.asarray(masks)
  for i in range(len(masks)):
    for j in range(i + 1, len(masks)):
      assert not np.array_equal(masks[i], masks[j]), (i, j)


def test_dropout_masks_differ_per_layer_and_per_step():
  stack = Stack(DropBlock, 4, rngs=nnx.Rngs(0, dropout=1))
  x = jnp.zeros(())
  _, first = stack(x)
  _, second = stack(x)
  _assert_rows_differ(first)
  assert set(np.unique(first).tolist()) <= {0.0, 2.0}
  for i in range(4):
    assert not np.array_equal(first[i], second[i]), i
  np.testing.assert_array_equal(stack.block.drop.rngs.count.value, [2, 2, 2, 2])
  _, third = nnx.jit(lambda m, x: m(x))(stack, x)
  for i in range(4):
    assert not np.array_equal(third[i], second[i]), i
  # A layer list converted from the stack draws the same masks.
  blocks = stack.to_blocks()
  _, fourth = stack(x)
  for i, block in enumerate(blocks):
    np.testing.assert_array_equal(block(x)[1], fourth[i])


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_dropout_under_remat_and_jit(remat):
  stack = Stack(DropBlock, 3, rngs=nnx.Rngs(dropout=1), remat=remat)
  step = nnx.jit(lambda m, x: m(x))
  _, first = step(stack, jnp.zeros(()))
  _, second = step(stack, jnp.zeros(()))
  _assert_rows_differ(first)
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(stack.block.drop.rngs.count.value, [2, 2, 2])


def test_dropout_with_rngs_passed_at_call_time():
  stack = Stack(DropBlock, 3, rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=5)
  _, masks = stack(jnp.zeros(()), rngs=rngs)
  _assert_rows_differ(masks)
  assert int(rngs.dropout.count.value) == 3  # threaded from layer to layer
  _, again = stack(jnp.zeros(()), rngs=rngs)
  assert not np.array_equal(masks, again)


class NormBlock(nnx.Module):

  def __init__(self, rngs):
    self.lin = Linear(D, D, rngs=rngs)
    self.bn = BatchNorm(D, momentum=0.5, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.array(0))

  def __call__(self, x):
    self.calls += 1
    return self.bn(self.lin(x))


def test_batchnorm_statistics_and_counters_update_per_layer():
  stack = Stack(NormBlock, 3, rngs=nnx.Rngs(0))
  blocks = stack.to_blocks()
  x = x_input(batch=16) * 3 + 1
  close(stack(x), Deep(blocks)(x))
  means = np.asarray(stack.block.bn.mean.value)
  for i, block in enumerate(blocks):
    close(means[i], block.bn.mean.value)
    close(stack.block.bn.var.value[i], block.bn.var.value)
  _assert_rows_differ(means)
  assert not np.allclose(means, 0.0)
  stack(x)
  np.testing.assert_array_equal(stack.block.calls.value, [2, 2, 2])
  assert stack.block.bn.mean.logical_axes == ("layers", "norm")
  # Evaluation mode uses each layer's running statistics and leaves them alone.
  stack.eval()
  reference = Deep(stack.to_blocks())
  reference.eval()
  close(stack(x), reference(x))
  close(stack.block.bn.mean.value[2], reference.blocks[2].bn.mean.value)


@pytest.mark.parametrize("remat", [None, "none", "full", "save_dots",
                                   "save_dots_without_batch_dims", "save_only_named",
                                   jax.checkpoint_policies.nothing_saveable])
def test_remat_policies_give_identical_values_and_grads(remat):
  ref = Stack(MLPBlock, 3, rngs=nnx.Rngs(0))
  stack = Stack(MLPBlock, 3, rngs=nnx.Rngs(0), remat=remat, names=("hidden",))
  x = x_input()

  def loss(model):
    return jnp.sum(jnp.sin(model(x)))

  close(stack(x), ref(x), tol=1e-6)
  g, g_ref = flat(nnx.grad(loss)(stack)), flat(nnx.grad(loss)(ref))
  for path in g:
    close(g[path].value, g_ref[path].value, tol=1e-6)


def test_remat_full_rematerialises_in_the_backward_pass():
  stack = Stack(MLPBlock, 3, rngs=nnx.Rngs(0), remat="full")
  graphdef, state = nnx.split(stack)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x))

  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state, x_input()))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize("unroll", [2, 3, True])
def test_unroll(unroll):
  ref = Stack(MLPBlock, 3, rngs=nnx.Rngs(0))
  stack = Stack(MLPBlock, 3, rngs=nnx.Rngs(0), unroll=unroll)
  close(stack(x_input()), ref(x_input()))


# --- conversion --------------------------------------------------------------------


def test_from_blocks_to_blocks_round_trip():
  blocks = [MLPBlock(nnx.Rngs(i)) for i in range(4)]
  stack = Stack.from_blocks(blocks)
  assert stack.num_layers == 4
  assert stack.block.up.kernel.logical_axes == ("layers", "embed", "mlp")
  x = x_input()
  close(stack(x), Deep(blocks)(x), tol=1e-6)  # scan vs eager: ulp-level fusion noise
  back = stack.to_blocks()
  for a, b in zip(blocks, back):
    assert nnx.graphdef(a) == nnx.graphdef(b)
    fa, fb = flat(nnx.state(a)), flat(nnx.state(b))
    for path in fa:
      np.testing.assert_array_equal(fa[path].value, fb[path].value)
      assert fa[path].get_metadata() == fb[path].get_metadata()
  # Stack -> blocks -> Stack is the identity on state.
  again = Stack.from_blocks(stack.to_blocks())
  assert nnx.graphdef(again) == nnx.graphdef(stack)
  for path, v in flat(nnx.state(stack)).items():
    np.testing.assert_array_equal(v.value, flat(nnx.state(again))[path].value)
  np.testing.assert_array_equal(again(x), stack(x))  # identical numerics
  np.testing.assert_array_equal(Deep(back)(x), Deep(blocks)(x))


def test_conversion_keeps_stateful_layers():
  stack = Stack(NormBlock, 2, rngs=nnx.Rngs(0))
  stack(x_input(batch=8))
  blocks = stack.to_blocks()
  assert blocks[1].bn.mean.logical_axes == ("norm",)
  close(blocks[1].bn.mean.value, stack.block.bn.mean.value[1])
  blocks[0].calls.value = jnp.array(7)  # copies are independent
  assert int(stack.block.calls.value[0]) == 1
  drop = Stack.from_blocks([DropBlock(nnx.Rngs(i)) for i in range(3)])
  _, masks = drop(jnp.zeros(()))
  _assert_rows_differ(masks)


def test_stack_states_unstack_state_checkpoint_conversion():
  stack = Stack(MLPBlock, 3, rngs=nnx.Rngs(0))
  state = nnx.state(stack.block)
  per_layer = unstack_state(state)
  assert len(per_layer) == 3
  assert per_layer[2]["up"]["kernel"].logical_axes == ("embed", "mlp")
  restacked = stack_states(per_layer)
  for path, v in flat(state).items():
    got = flat(restacked)[path]
    np.testing.assert_array_equal(got.value, v.value)
    assert got.get_metadata() == v.get_metadata()
  # Pure dicts (what checkpoints store) convert both ways.
  pure = state.to_pure_dict()
  layers = unstack_state(pure)
  assert isinstance(layers[0], dict)
  np.testing.assert_array_equal(layers[1]["down"]["kernel"],
                                stack.block.down.kernel.value[1])
  np.testing.assert_array_equal(stack_states(layers)["up"]["bias"], pure["up"]["bias"])
  # A per-layer model's checkpoint loads into a Stack.
  deep = Deep([MLPBlock(nnx.Rngs(i)) for i in range(3)])
  nnx.update(stack.block, stack_states(nnx.state(deep)["blocks"]))
  close(stack(x_input()), deep(x_input()), tol=1e-6)
  ckpt = nnx.state(deep).to_pure_dict()["blocks"]
  nnx.update(stack, {"block": stack_states(ckpt)})
  close(stack(x_input()), deep(x_input()), tol=1e-6)


# --- sharding ----------------------------------------------------------------------


def test_layers_axis_resolved_by_rules():
  mesh = spmd.make_mesh(spmd.MeshConfig(fsdp=8))
  with spmd.use_sharding(mesh, "fsdp"):
    stack = spmd.sharded_init(lambda: Stack(MLPBlock, 4, rngs=nnx.Rngs(0)))
  assert stack.block.up.kernel.value.sharding.spec == P(None, "fsdp", None)
  assert stack.block.down.kernel.value.sharding.spec == P(None, None, "fsdp")
  assert stack.block.up.kernel.value.addressable_shards[0].data.shape == (4, 1, 2 * D)

  staged = spmd.AxisRules.load("fsdp").override(layers="stage")
  mesh2 = spmd.make_mesh(spmd.MeshConfig(stage=2, fsdp=4))
  with spmd.use_sharding(mesh2, staged):
    stack2 = spmd.sharded_init(lambda: Stack(MLPBlock, 4, rngs=nnx.Rngs(0)))
    x = x_input()
    y = nnx.jit(lambda m, x: m(x))(stack2, x)
  assert stack2.block.up.kernel.value.sharding.spec == P("stage", "fsdp", None)
  np.testing.assert_array_equal(stack2.block.up.kernel.value, stack.block.up.kernel.value)
  close(y, stack(x))
  rows = {r["path"]: r for r in spmd.sharding_report(stack2).to_dict()["rows"]}
  assert rows["block/up/kernel"]["logical_axes"] == ["layers", "embed", "mlp"]
  assert rows["block/up/kernel"]["spec"] == ["stage", "fsdp", None]


def test_optimizer_state_keeps_layers_axis_and_sharding():
  mesh = spmd.make_mesh(spmd.MeshConfig(fsdp=8))
  tx = optax.adam(1e-2)
  x = x_input(batch=8)
  with spmd.use_sharding(mesh, "fsdp"):
    opt = spmd.sharded_init(
        lambda: Optimizer(Stack(MLPBlock, 4, rngs=nnx.Rngs(0), remat="full"), tx,
                          wrt=nnx.Param))
    mu = opt.opt_state[0]["mu"]["block"]["up"]["kernel"]
    assert mu.logical_axes == ("layers", "embed", "mlp")
    assert mu.shape == (4, D, 2 * D)

    @nnx.jit
    def train_step(opt, x):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(opt.model)
      opt.update(opt.model, grads)
      return loss

    losses = [float(train_step(opt, x)) for _ in range(3)]
  assert losses[-1] < losses[0]
  for moment in ("mu", "nu"):
    up = opt.opt_state[0][moment]["block"]["up"]["kernel"]
    down = opt.opt_state[0][moment]["block"]["down"]["kernel"]
    assert up.logical_axes == ("layers", "embed", "mlp")
    assert up.value.sharding.spec == P(None, "fsdp", None)
    assert down.value.sharding.spec == P(None, None, "fsdp")
  assert opt.model.block.up.kernel.value.sharding.spec == P(None, "fsdp", None)


def test_fsdp_stack_gathers_one_layer_at_a_time():
  """Per-device temporaries of a remat'ed train step stay far below the stack's size.

  Temporaries hold the sharded gradient stack (1/8 of the parameters) and a
  few full layers (all-gathered weights, per-layer gradients); gathering the
  whole stack at once would need the full parameter bytes.
  """
  layers, d, hidden = 32, 64, 256
  mesh = spmd.make_mesh(spmd.MeshConfig(fsdp=8))
  with spmd.use_sharding(mesh, "fsdp"):
    stack = spmd.sharded_init(lambda: Stack(
        lambda r: MLPBlock(r, d=d, hidden=hidden), layers, rngs=nnx.Rngs(0),
        remat="full"))
    x = spmd.shard_batch(np.ones((16, d), np.float32))

    @nnx.jit
    def step(model, x):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param),
                                     grads))

    compiled = step.lower(stack, x).compile()
  param_bytes = sum(v.value.size * 4 for _, v in nnx.state(stack).flat_state())
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 0.25 * param_bytes, (temp, param_bytes)


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -2, True, 2.0])
def test_bad_num_layers(n):
  with pytest.raises(errors.ConfigError, match="num_layers must be a positive int"):
    Stack(MLPBlock, n, rngs=nnx.Rngs(0))


def test_unknown_remat_policy():
  with pytest.raises(errors.ConfigError, match=r"unknown remat policy 'save_everything'"):
    Stack(MLPBlock, 2, rngs=nnx.Rngs(0), remat="save_everything")
  with pytest.raises(errors.ConfigError, match="needs names="):
    Stack(MLPBlock, 2, rngs=nnx.Rngs(0), remat="save_only_named")
  with pytest.raises(errors.ConfigError, match="unknown remat policy"):
    Stack.from_blocks([MLPBlock(nnx.Rngs(0))], remat="fulll")


def test_bad_unroll_stack_axis_rngs_and_block():
  with pytest.raises(errors.ConfigError, match="unroll must be a positive int"):
    Stack(MLPBlock, 2, rngs=nnx.Rngs(0), unroll=0)
  with pytest.raises(errors.ConfigError, match="stack_axis must be a non-empty"):
    Stack(MLPBlock, 2, rngs=nnx.Rngs(0), stack_axis="")
  with pytest.raises(errors.ConfigError, match="rngs must be an nnx.Rngs"):
    Stack(MLPBlock, 2, rngs=0)
  with pytest.raises(errors.ConfigError, match="make_block must return a Module"):
    Stack(lambda rngs: jnp.zeros(3), 2, rngs=nnx.Rngs(0))


class Widen(nnx.Module):

  def __init__(self, rngs):
    self.lin = Linear(D, 2 * D, rngs=rngs)

  def __call__(self, x):
    return self.lin(x)


def test_carry_changing_shape_is_an_error():
  stack = Stack(Widen, 2, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError,
                     match=r"changes the carry's shape or dtype: it receives "
                           r"\(float32\[4, 8\]\) and returns \(float32\[4, 16\]\)"):
    stack(x_input())
  cast = Stack(lambda r: _Cast(), 2, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError, match="changes the carry's shape or dtype"):
    cast(x_input())
  odd = Stack(lambda r: _Odd(), 2, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError, match=r"must return the next carry .* or a pair"):
    odd(x_input())


class _Cast(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.ones(()))

  def __call__(self, x):
    return (x * self.w).astype(jnp.bfloat16)


class _Odd(_Cast):

  def __call__(self, x):
    return x, x, x


def test_per_layer_input_with_wrong_length():
  stack = Stack(BiasBlock, 3, rngs=nnx.Rngs(0))
  with pytest.raises(errors.TransformError,
                     match=r"leading axis of size num_layers=3.*argument 1 \(shape \(2, 8\)\)"):
    stack(x_input(), jnp.zeros((2, D)), scale=1.0)


def test_from_blocks_with_different_structure():
  with pytest.raises(errors.ConfigError,
                     match=r"blocks differ in structure.*block 1 up/kernel: Param "
                           r"float32\[8, 32\].* vs Param float32\[8, 16\]"):
    Stack.from_blocks([MLPBlock(nnx.Rngs(0)), MLPBlock(nnx.Rngs(1), hidden=4 * D)])
  with pytest.raises(errors.ConfigError, match=r"block 2 lacks lin/bias"):
    Stack.from_blocks([Linear(2, 2, rngs=nnx.Rngs(0))] * 0 +
                      [_Wrap(True), _Wrap(True), _Wrap(False)])
  with pytest.raises(errors.ConfigError, match=r"block 1 differs from block 0 in its "
                                               r"static structure"):
    Stack.from_blocks([Dropout(0.1, rngs=nnx.Rngs(0)), Dropout(0.2, rngs=nnx.Rngs(0))])
  with pytest.raises(errors.ConfigError, match=r"axes=\('mlp', 'embed'\)"):
    Stack.from_blocks([Linear(2, 2, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0)),
                       Linear(2, 2, kernel_axes=("mlp", "embed"), rngs=nnx.Rngs(0))])
  with pytest.raises(errors.ConfigError, match="got no blocks"):
    Stack.from_blocks([])
  with pytest.raises(errors.ConfigError, match=r"not Modules: 1 \(ndarray\)"):
    Stack.from_blocks([MLPBlock(nnx.Rngs(0)), np.zeros(3)])
  shared = MLPBlock(nnx.Rngs(0))
  # Paths in name order (down/... before up/...).
  with pytest.raises(errors.ConfigError, match=r"blocks share Variables: down/bias "
                                               r"\(blocks 0 and 1\).*up/kernel"):
    Stack.from_blocks([shared, shared])


class _Wrap(nnx.Module):

  def __init__(self, bias):
    self.lin = Linear(2, 2, use_bias=bias, rngs=nnx.Rngs(0))


def test_state_conversion_errors():
  with pytest.raises(errors.ConfigError, match="got no layers"):
    stack_states([])
  with pytest.raises(errors.ConfigError, match=r"needs the keys 0\.\.1"):
    stack_states({0: {"w": jnp.ones(2)}, 2: {"w": jnp.ones(2)}})
  with pytest.raises(errors.ConfigError, match=r"layer 1 w: array float32\[3\] vs "
                                               r"array float32\[2\]"):
    stack_states([{"w": jnp.ones(2)}, {"w": jnp.ones(3)}])
  with pytest.raises(errors.ConfigError, match=r"leading axes differ \(size 2: a; size 3: b\)"):
    unstack_state({"a": jnp.ones((2, 1)), "b": jnp.ones((3, 1))})
  with pytest.raises(errors.ConfigError, match="c is a scalar"):
    unstack_state({"c": jnp.ones(())})
  w = nnx.Param(jnp.ones((2, 3)), logical_axes=("embed", "mlp"))
  with pytest.raises(errors.ConfigError, match=r"not starting with 'layers'"):
    unstack_state(nnx.State({"w": w}))
  with pytest.raises(errors.ConfigError, match="expected a State or a nested dict"):
    unstack_state([jnp.ones(2)])


# --- docs --------------------------------------------------------------------------


@pytest.mark.parametrize("module", [stack_lib, stack_convert])
def test_doctests(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "scan.md"
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_scan_doc_has_blocks():
  assert len(DOC_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_scan_doc_block_runs(index):
  exec(compile(DOC_BLOCKS[index], f"scan.md block {index}", "exec"), {})


def test_stack_factory_using_a_captured_rngs_error():
  outer = nnx.Rngs(0)
  with pytest.raises(errors.TraceContextError,
                     match=r"Rngs stream 'default' was drawn inside vmap\(Stack.*\), but "
                     r"its Rngs was created outside it .*a Stack make_block that uses the "
                     r"Rngs it is given"):
    Stack(lambda rngs: Linear(2, 2, rngs=outer), 3, rngs=nnx.Rngs(1))


def test_stacked_module_doctests_and_one_layers_default():
  import inspect
  from spmdnnx import _stacked
  result = doctest.testmod(_stacked)
  assert result.attempted > 0 and result.failed == 0
  defaults = [inspect.signature(f).parameters["stack_axis"].default
              for f in (nnx.vmap, nnx.scan, Stack, Stack.from_blocks, stack_states,
                        unstack_state)]
  assert defaults == [_stacked.LAYERS_AXIS] * 6


def test_stack_states_mapping_needs_consecutive_keys():
  with pytest.raises(errors.ConfigError, match=r"stack_states: a mapping of layers needs the "
                     r"keys 0\.\.1 .*got 0, 2"):
    stack_states({0: {"w": jnp.zeros(2)}, 2: {"w": jnp.ones(2)}})


def test_unstack_state_of_unstacked_leaves_error():
  state = nnx.State({"s": jnp.zeros(()),
                     "w": nnx.Param(jnp.zeros((2, 3)), logical_axes=("embed", "mlp"))})
  with pytest.raises(errors.ConfigError, match=r"unstack_state: the state is not stacked along "
                     r"'layers': s is a scalar .*w has logical_axes \('embed', 'mlp'\), not "
                     r"starting with 'layers'"):
    unstack_state(state)
