"""Tests for spmdnnx._transforms.vmap: stacks, StateAxes, metadata, errors."""

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from tx_models import Counter, Linear, RunningMean, close


def make_stack(n, *, seed=0, **vmap_kwargs):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0, **vmap_kwargs)
  def create(rngs):
    return Linear(2, 3, rngs=rngs)

  return create(nnx.Rngs(seed))


# --- creating stacks ---------------------------------------------------------------


def test_vmap_constructor_stacks_weights_with_layers_axis():
  rngs = nnx.Rngs(0)

  @nnx.split_rngs(splits=4)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(r):
    return Linear(2, 3, rngs=r)

  stack = create(rngs)
  assert stack.w.shape == (4, 2, 3) and stack.b.shape == (4, 3)
  assert stack.w.logical_axes == ("layers", "embed", "mlp")
  assert stack.b.logical_axes == ("layers", "mlp")
  w = stack.w.value
  for i in range(4):
    for j in range(i + 1, 4):
      assert not close(w[i], w[j]), f"layers {i} and {j} got the same weights"
  # After split_rngs the stream has its scalar key back, advanced by one draw.
  assert rngs.default.key.value.shape == ()
  assert int(rngs.default.count.value) == 1


def test_split_rngs_gives_same_stack_for_same_seed_and_new_one_after():
  a, b = make_stack(3, seed=5), make_stack(3, seed=5)
  assert close(a.w.value, b.w.value)
  rngs = nnx.Rngs(5)

  @nnx.split_rngs(splits=3)
  @nnx.vmap
  def create(r):
    return Linear(2, 3, rngs=r)

  first, second = create(rngs), create(rngs)
  assert not close(first.w.value, second.w.value)


def test_stack_axis_none_opts_out_of_metadata():
  stack = make_stack(3, stack_axis=None)
  assert stack.w.shape == (3, 2, 3)
  assert stack.w.logical_axes == ("embed", "mlp")


def test_stack_axis_custom_name():
  stack = make_stack(3, stack_axis="stage")
  assert stack.w.logical_axes == ("stage", "embed", "mlp")
  assert stack.b.logical_axes == ("stage", "mlp")


def test_transform_metadata_partition_name():
  stack = make_stack(3, transform_metadata={nnx.PARTITION_NAME: "stage"})
  assert nnx.PARTITION_NAME == "partition_name"
  assert stack.w.logical_axes == ("stage", "embed", "mlp")


def test_vmap_out_axes_one_inserts_name_at_that_position():
  stack = make_stack(3)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0, out_axes=1)
  def create(r):
    return Linear(2, 5, rngs=r)

  stack = create(nnx.Rngs(0))
  assert stack.w.shape == (2, 3, 5)
  assert stack.w.logical_axes == ("embed", "layers", "mlp")
  assert stack.b.logical_axes == ("mlp", "layers")


class StackedMLP(nnx.Module):

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0, 0))
  def __init__(self, rngs):
    self.lin = Linear(2, 2, rngs=rngs)
    self.seen_axes = self.lin.w.logical_axes

  @nnx.vmap(in_axes=(0, None))
  def __call__(self, x):
    self.seen_in_call = self.lin.w.logical_axes
    return self.lin(x)


def test_vmap_on_init_method_creates_stack():
  m = StackedMLP(nnx.Rngs(1))
  assert m.lin.w.shape == (3, 2, 2)
  assert m.lin.w.logical_axes == ("layers", "embed", "mlp")
  # Inside the constructor the Variables had their per-layer axes only.
  assert m.seen_axes == ("embed", "mlp")
  assert not close(m.lin.w.value[0], m.lin.w.value[1])


def test_vmap_on_call_method_equals_loop_over_slices():
  m = StackedMLP(nnx.Rngs(1))
  x = jnp.arange(10.0).reshape(5, 2)
  out = m(x)
  assert out.shape == (3, 5, 2)
  for i in range(3):
    ref = x @ m.lin.w.value[i] + m.lin.b.value[i]
    assert close(out[i], ref)
  # Inside the body the stacked name is absent; outside it is restored.
  assert m.lin.w.logical_axes == ("layers", "embed", "mlp")


# --- applying to stacks ----------------------------------------------------------


def test_in_axes_module_and_broadcast_input_equals_loop():
  stack = make_stack(4)
  x = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
  seen = []

  def apply(m, x):
    seen.append((m.w.shape, m.w.logical_axes))
    return m(x)

  out = nnx.vmap(apply, in_axes=(0, None))(stack, x)
  assert out.shape == (4, 3, 3)
  assert seen == [((2, 3), ("embed", "mlp"))]
  for i in range(4):
    assert close(out[i], x @ stack.w.value[i] + stack.b.value[i])
  assert stack.w.logical_axes == ("layers", "embed", "mlp")


def test_module_and_input_both_mapped():
  stack = make_stack(3)
  xs = jnp.arange(12.0).reshape(3, 2, 2)
  out = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(stack, xs)
  for i in range(3):
    assert close(out[i], xs[i] @ stack.w.value[i] + stack.b.value[i])


def test_state_axes_param_mapped_batchstat_broadcast():
  class Layer(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(6.0).reshape(3, 2), logical_axes=("layers", "mlp"))
      self.mean = nnx.BatchStat(jnp.zeros(2), logical_axes=("mlp",))

  m = Layer()
  seen = {}

  def f(m, x):
    seen["w"] = (m.w.shape, m.w.logical_axes)
    seen["mean"] = (m.mean.shape, m.mean.logical_axes)
    m.mean.value = m.mean.value + 1.0
    return m.w.value * x

  axes = nnx.StateAxes({nnx.Param: 0, nnx.BatchStat: None})
  out = nnx.vmap(f, in_axes=(axes, 0))(m, jnp.array([1.0, 2.0, 3.0]))
  assert seen == {"w": ((2,), ("mlp",)), "mean": ((2,), ("mlp",))}
  assert close(out, jnp.arange(6.0).reshape(3, 2) * jnp.array([[1.0], [2.0], [3.0]]))
  assert close(m.mean.value, jnp.ones(2))
  assert m.w.logical_axes == ("layers", "mlp")
  assert m.mean.logical_axes == ("mlp",)


def test_state_axes_non_zero_axis():
  class Layer(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(8.0).reshape(2, 4), logical_axes=("mlp", "layers"))
      self.n = Counter()

  m = Layer()

  def f(m, x):
    assert m.w.logical_axes == ("mlp",)
    m.w.value = m.w.value * 2.0
    return m.w.value.sum() + x

  axes = nnx.StateAxes({nnx.Param: 1, ...: None})
  out = nnx.vmap(f, in_axes=(axes, 0))(m, jnp.zeros(4))
  base = jnp.arange(8.0).reshape(2, 4)
  assert close(out, 2.0 * base.sum(axis=0))
  assert close(m.w.value, 2.0 * base)
  assert m.w.shape == (2, 4) and m.w.logical_axes == ("mlp", "layers")


def test_mapped_state_updates_propagate_per_slice():
  rm = RunningMean(2)
  stacked = nnx.vmap(lambda: RunningMean(2), axis_size=3)()
  assert stacked.mean.shape == (3, 2)
  assert stacked.mean.logical_axes == ("layers", "mlp")
  xs = jnp.arange(12.0).reshape(3, 2, 2)
  nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(stacked, xs)
  for i in range(3):
    assert close(stacked.mean.value[i], 0.5 * xs[i].mean(axis=0))
  del rm


def test_per_example_gradients():
  lin = Linear(2, 3, rngs=nnx.Rngs(0))
  xs = jnp.arange(8.0).reshape(4, 1, 2)

  def loss(m, x):
    return (m(x) ** 2).sum()

  grads = nnx.vmap(nnx.grad(loss), in_axes=(None, 0))(lin, xs)
  assert grads["w"].shape == (4, 2, 3)
  for i in range(4):
    ref = nnx.grad(loss)(lin, xs[i])
    assert close(grads["w"].value[i], ref["w"].value)
    assert close(grads["b"].value[i], ref["b"].value)


def test_vmap_plain_arrays_and_pytrees():
  out = nnx.vmap(lambda d: d["a"] * d["b"], in_axes=({"a": 0, "b": None},))(
      {"a": jnp.arange(3.0), "b": jnp.array(2.0)})
  assert close(out, jnp.array([0.0, 2.0, 4.0]))


# --- errors --------------------------------------------------------------------------


def test_error_module_lacks_mapped_axis():
  c = Counter()
  with pytest.raises(errors.TransformError,
                     match=r"cannot map these Variables.*count \(shape \(\), axis 0\)"
                           r".*StateAxes") as info:
    nnx.vmap(lambda c, x: x, in_axes=(0, 0))(c, jnp.ones(3))
  assert info.value.paths == [("count",)] and info.value.shapes == [()]


def test_error_module_state_sizes_disagree():
  lin = Linear(2, 3, rngs=nnx.Rngs(0))  # w (2, 3) and b (3,): not a stack
  with pytest.raises(errors.TransformError,
                     match=r"different sizes \(size 3: b; size 2: w\)"):
    nnx.vmap(lambda m: m.w.value, in_axes=0)(lin)


def test_error_stack_and_input_sizes_disagree():
  stack = make_stack(4)
  with pytest.raises(errors.TransformError,
                     match=r"different sizes \(size 4: .*; size 5: argument leaf 0 \(5, 2\)\)"):
    nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(stack, jnp.ones((5, 2)))


def test_error_plain_inputs_sizes_disagree():
  with pytest.raises(errors.TransformError, match=r"size 4: .*size 3: "):
    nnx.vmap(lambda x, y: x + y)(jnp.ones((4, 2)), jnp.ones((3, 2)))


def test_error_state_axes_do_not_cover_state():
  rm = RunningMean(3)
  with pytest.raises(errors.TransformError,
                     match=r"StateAxes filters do not cover 1 state leaves: mean.*`...: None`"
                     ) as info:
    nnx.vmap(lambda m, x: m(x), in_axes=(nnx.StateAxes({nnx.Param: None}), 0))(
        rm, jnp.ones((4, 2, 3)))
  assert info.value.paths == [("mean",)]


def test_error_carry_in_vmap():
  with pytest.raises(errors.TransformError, match="Carry is only meaningful for scan"):
    nnx.vmap(lambda x: x, in_axes=(nnx.Carry,))(jnp.ones(3))


def test_error_in_axes_length():
  with pytest.raises(errors.TransformError, match="in_axes has 1 entries .* 2 positional"):
    nnx.vmap(lambda x, y: x, in_axes=(0,))(jnp.ones(3), jnp.ones(3))


def test_error_state_axes_on_plain_argument():
  with pytest.raises(errors.TransformError, match="StateAxes given for an argument that is not"):
    nnx.vmap(lambda x: x, in_axes=(nnx.StateAxes({...: 0}),))(jnp.ones(3))


def test_error_state_axes_bad_value():
  with pytest.raises(errors.TransformError, match="StateAxes values must be an int"):
    nnx.StateAxes({nnx.Param: "layers"})


def test_error_batched_write_into_broadcast_state():
  rm = RunningMean(3)
  with pytest.raises(errors.TransformError,
                     match=r"state mean is broadcast \(in_axes None\).*per-example"):
    nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(rm, jnp.ones((4, 2, 3)))
  assert close(rm.mean.value, jnp.zeros(3))


def test_error_in_axes_entry_not_a_prefix_of_the_argument():
  with pytest.raises(errors.TransformError, match=r"vmap\(.*\): in_axes entry \(0, 0\) is not a "
                     r"pytree prefix of the argument \(ArrayImpl\)"):
    nnx.vmap(lambda x: x, in_axes=((0, 0),))(jnp.ones((2, 3)))


def test_error_plain_argument_lacks_the_mapped_axis():
  with pytest.raises(errors.TransformError, match=r"in_axes asks to map argument leaf 0 "
                     r"\(shape \(2, 3\)\) along axis 2, which it lacks; use None"):
    nnx.vmap(lambda x: x, in_axes=2)(jnp.ones((2, 3)))


def test_vmap_maps_variables_holding_pytrees_leaf_by_leaf():
  """A Variable whose value is a dict (capture's sown values) is mapped per leaf."""
  class Holder(nnx.Module):
    def __init__(self):
      self.sown = nnx.Intermediate({"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones((3,))})

  h = Holder()
  out = nnx.vmap(lambda m: m.sown.value["a"].sum() + m.sown.value["b"], in_axes=0)(h)
  assert close(out, jnp.array([2.0, 6.0, 10.0]))
  bad = Holder()
  bad.sown = nnx.Intermediate({"a": jnp.ones((3, 2)), "b": jnp.ones(())})
  with pytest.raises(errors.TransformError, match=r"their arrays lack it: sown \(shape \(\), "
                     r"axis 0\)"):
    nnx.vmap(lambda m: m.sown.value["a"], in_axes=0)(bad)
