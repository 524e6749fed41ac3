"""Tests for spmdnnx._transforms.scan: stacks, carries, state propagation, errors."""

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from tx_models import Block, Counter, Drop, Linear, RunningMean, close

L, EMBED, MLP = 4, 3, 5


def make_blocks(n=L, seed=0):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return Block(EMBED, MLP, rngs=rngs)

  return create(nnx.Rngs(seed))


class Unrolled(nnx.Module):
  """The same weights as a stack, one Block per layer, applied in a loop."""

  def __init__(self, stack, n=L):
    self.blocks = nnx.List([Block(EMBED, MLP, rngs=nnx.Rngs(99)) for _ in range(n)])
    for i, blk in enumerate(self.blocks):
      for lin in ("up", "down"):
        for p in ("w", "b"):
          src = getattr(getattr(stack, lin), p).value[i]
          getattr(getattr(blk, lin), p).value = src

  def __call__(self, x):
    for blk in self.blocks:
      x = blk(x)
    return x


def scanned_forward(stack, x):
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(x, blk):
    return blk(x)

  return step(x, stack)


def test_scanned_stack_equals_unrolled_loop_outputs():
  stack = make_blocks()
  assert stack.up.w.logical_axes == ("layers", "embed", "mlp")
  unrolled = Unrolled(stack)
  x = jnp.linspace(-1.0, 1.0, 2 * EMBED).reshape(2, EMBED)
  assert close(scanned_forward(stack, x), unrolled(x))
  assert stack.up.w.logical_axes == ("layers", "embed", "mlp")


def test_scanned_stack_equals_unrolled_loop_gradients():
  stack = make_blocks()
  unrolled = Unrolled(stack)
  x = jnp.linspace(-1.0, 1.0, 2 * EMBED).reshape(2, EMBED)

  g_scan = nnx.grad(lambda m, x: (scanned_forward(m, x) ** 2).sum())(stack, x)
  g_loop = nnx.grad(lambda m, x: (m(x) ** 2).sum())(unrolled, x)
  assert g_scan["up"]["w"].shape == (L, EMBED, MLP)
  assert g_scan["up"]["w"].logical_axes == ("layers", "embed", "mlp")
  for i in range(L):
    for lin in ("up", "down"):
      for p in ("w", "b"):
        assert close(g_scan[lin][p].value[i], g_loop["blocks"][i][lin][p].value), (i, lin, p)


def test_scanned_stack_under_jit_and_grad():
  stack = make_blocks()
  unrolled = Unrolled(stack)
  x = jnp.ones((2, EMBED))

  @nnx.jit
  def loss_and_grad(m, x):
    return nnx.value_and_grad(lambda m, x: (scanned_forward(m, x) ** 2).sum())(m, x)

  value, grads = loss_and_grad(stack, x)
  assert close(value, (unrolled(x) ** 2).sum())
  assert grads["down"]["b"].shape == (L, EMBED)


def test_inside_body_stacked_axis_removed():
  stack = make_blocks()
  seen = []

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(x, blk):
    seen.append((blk.up.w.shape, blk.up.w.logical_axes))
    return blk(x)

  step(jnp.ones((1, EMBED)), stack)
  assert seen == [((EMBED, MLP), ("embed", "mlp"))]


def test_carry_as_second_argument_and_per_step_outputs():
  stack = make_blocks()

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
  def step(blk, x):
    y = blk(x)
    return y, y.sum()

  x = jnp.ones((2, EMBED))
  final, sums = step(stack, x)
  ref, ref_sums = x, []
  unrolled = Unrolled(stack)
  for blk in unrolled.blocks:
    ref = blk(ref)
    ref_sums.append(ref.sum())
  assert close(final, ref)
  assert sums.shape == (L,)
  assert close(sums, jnp.stack(ref_sums))


def test_out_axes_nonzero_stacks_along_that_axis():
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 1))
  def step(c, x):
    return c + x.sum(), jnp.stack([x, -x])

  xs = jnp.arange(12.0).reshape(4, 3)
  total, ys = step(jnp.array(0.0), xs)
  assert float(total) == 66.0
  assert ys.shape == (2, 4, 3)
  assert close(ys[0], xs) and close(ys[1], -xs)


def test_module_as_carry():
  counter = Counter()

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def step(c, x):
    c.count += 1
    return c, c.count.value * x

  out_counter, ys = step(counter, jnp.array([10, 20, 30]))
  assert out_counter is counter
  assert int(counter.count.value) == 3
  assert ys.tolist() == [10, 40, 90]


def test_reverse():
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), reverse=True)
  def step(c, x):
    return c + x, c

  total, partials = step(jnp.array(0.0), jnp.arange(4.0))
  assert float(total) == 6.0
  assert partials.tolist() == [6.0, 5.0, 3.0, 0.0]


def test_reverse_over_module_stack_visits_last_layer_first():
  stack = make_blocks()
  unrolled = Unrolled(stack)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, reverse=True)
  def step(x, blk):
    return blk(x)

  x = jnp.ones((1, EMBED))
  ref = x
  for blk in reversed(list(unrolled.blocks)):
    ref = blk(ref)
  assert close(step(x, stack), ref)


def test_length_with_no_scanned_inputs():
  counter = Counter()

  @nnx.scan(in_axes=(nnx.Carry, None), out_axes=(nnx.Carry, 0), length=5)
  def step(c, m):
    m.count += 1
    return c * 2, m.count.value

  c, counts = step(jnp.array(1), counter)
  assert int(c) == 32
  assert counts.tolist() == [1, 2, 3, 4, 5]
  assert int(counter.count.value) == 5


def test_unroll_gives_same_result():
  stack = make_blocks()
  x = jnp.ones((1, EMBED))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=2)
  def step(x, blk):
    return blk(x)

  assert close(step(x, stack), scanned_forward(stack, x))


def test_batchnorm_like_stats_updated_per_layer():
  stats = nnx.vmap(lambda: RunningMean(EMBED), axis_size=3)()
  assert stats.mean.logical_axes == ("layers", "mlp")
  ref = [RunningMean(EMBED) for _ in range(3)]

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(x, layer):
    return layer(x) + 1.0

  x = jnp.arange(6.0).reshape(2, EMBED)
  out = step(x, stats)
  r = x
  for layer in ref:
    r = layer(r) + 1.0
  assert close(out, r)
  for i in range(3):
    assert close(stats.mean.value[i], ref[i].mean.value)
  assert not close(stats.mean.value[0], stats.mean.value[1])
  assert stats.mean.logical_axes == ("layers", "mlp")


def test_broadcast_rngs_advance_each_step():
  drop = Drop(0.5, rngs=nnx.Rngs(dropout=3))

  @nnx.scan(in_axes=(None, 0), out_axes=0)
  def step(d, x):
    return d(x)

  xs = jnp.ones((4, 64))
  masks = step(drop, xs) != 0
  assert int(drop.rngs.dropout.count.value) == 4
  for i in range(4):
    for j in range(i + 1, 4):
      assert bool((masks[i] != masks[j]).any()), f"steps {i} and {j} drew the same key"
  # A second call continues from the advanced counter.
  again = step(drop, xs) != 0
  assert bool((again[0] != masks[0]).any())
  assert int(drop.rngs.dropout.count.value) == 8


def test_state_axes_scanned_params_and_carried_counter():
  class Layer(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(3.0), logical_axes=("layers",))
      self.calls = Counter()

  m = Layer()

  @nnx.scan(in_axes=(nnx.StateAxes({nnx.Param: 0, ...: nnx.Carry}), nnx.Carry),
            out_axes=nnx.Carry)
  def step(m, x):
    m.calls.count += 1
    assert m.w.shape == ()
    return x + m.w.value

  assert float(step(m, jnp.array(0.0))) == 3.0
  assert int(m.calls.count.value) == 3
  assert m.w.logical_axes == ("layers",)


def test_scan_inside_jit_propagates_state():
  counter = Counter()

  @nnx.jit
  def run(c, xs):
    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
    def step(c, acc, x):
      c.count += 1
      return acc + x

    return step(c, jnp.array(0.0), xs)

  assert float(run(counter, jnp.arange(4.0))) == 6.0
  assert int(counter.count.value) == 4
  run(counter, jnp.arange(4.0))
  assert int(counter.count.value) == 8


def test_scanned_params_updated_inside_body_come_back_stacked():
  stack = make_blocks()
  before = stack.up.b.value

  @nnx.scan(in_axes=(0,), out_axes=0)
  def bump(blk):
    blk.up.b.value = blk.up.b.value + 1.0
    return blk.up.b.value.sum()

  sums = bump(stack)
  assert sums.shape == (L,)
  assert close(stack.up.b.value, before + 1.0)
  assert stack.up.b.logical_axes == ("layers", "mlp")


# --- errors --------------------------------------------------------------------------


def test_error_carry_in_in_axes_but_not_out_axes():
  # Raised when scan is applied, before any call.
  with pytest.raises(errors.TransformError,
                     match=r"If one of in_axes or out_axes has Carry.*"
                           r"out_axes=\(nnx.Carry, 0\)"):
    nnx.scan(lambda c, x: c + x, in_axes=(nnx.Carry, 0), out_axes=0)


def test_error_out_axes_carry_without_in_axes_carry():
  with pytest.raises(errors.TransformError,
                     match=r"If one of in_axes or out_axes has Carry.*in_axes=\(None, 0\)"):
    nnx.scan(lambda c, x: (c, x), in_axes=(None, 0), out_axes=(nnx.Carry, 0))


def test_error_two_carry_arguments():
  with pytest.raises(errors.TransformError,
                     match=r"multiple Carry definitions in in_axes; at most one"):
    nnx.scan(lambda a, b: (a, b), in_axes=(nnx.Carry, nnx.Carry), out_axes=nnx.Carry)


def test_error_carry_shape_changes():
  f = nnx.scan(lambda c, x: (jnp.concatenate([c, c]), x), in_axes=(nnx.Carry, 0),
               out_axes=(nnx.Carry, 0))
  with pytest.raises(errors.TransformError,
                     match=r"carry changes shape or dtype across steps: in \[\(\(2,\), "
                           r"dtype\('float32'\)\)\], out \[\(\(4,\)"):
    f(jnp.zeros(2), jnp.arange(3.0))


def test_error_carry_structure_changes():
  f = nnx.scan(lambda c, x: ((c, c), x), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  with pytest.raises(errors.TransformError, match="return a carry with the same structure"):
    f(jnp.zeros(2), jnp.arange(3.0))


def test_error_body_adds_variable():
  counter = Counter()

  def step(c, x):
    c.extra = nnx.Variable(x)
    return c, x

  f = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  with pytest.raises(errors.TransformError,
                     match=r"added, removed or swapped Variables.*extra.*Create the state before"):
    f(counter, jnp.arange(3.0))
  assert not hasattr(counter, "extra")
  assert int(counter.count.value) == 0


def test_body_returns_new_module_stacked():
  # Flax semantics: Modules created in a step come out stacked along out_axes.
  f = nnx.scan(lambda c, x: (c, Counter()), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  c, made = f(jnp.zeros(()), jnp.arange(3.0))
  assert isinstance(made, Counter) and made.count.value.shape == (3,)


def test_error_carry_holds_new_module():
  f = nnx.scan(lambda c, x: (Counter(), x), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  with pytest.raises(errors.TransformError, match="Carry references must be the same.*carry cannot hold graph objects"):
    f(jnp.zeros(()), jnp.arange(3.0))


def test_error_nothing_scanned_without_length():
  f = nnx.scan(lambda c: c, in_axes=(nnx.Carry,), out_axes=nnx.Carry)
  with pytest.raises(errors.TransformError, match="nothing is scanned.*pass length="):
    f(jnp.zeros(()))


def test_error_scanned_lengths_differ():
  f = nnx.scan(lambda c, x, y: c, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
  with pytest.raises(errors.TransformError, match=r"different lengths \(3 and 4\)"):
    f(jnp.zeros(()), jnp.zeros(3), jnp.zeros(4))


def test_error_out_axes_none():
  with pytest.raises(errors.TransformError,
                     match=r"Cannot broadcast output state: out_axes\[1\] is None"):
    nnx.scan(lambda c, x: (c, x), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, None))


def test_error_scanned_module_lacks_axis():
  counter = Counter()
  f = nnx.scan(lambda c, m: c, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  with pytest.raises(errors.TransformError,
                     match=r"cannot map these Variables.*count \(shape \(\), axis 0\)"):
    f(jnp.zeros(()), counter)


def test_error_out_axes_tuple_but_single_output():
  f = nnx.scan(lambda c, x: c, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  with pytest.raises(errors.TransformError,
                     match="out_axes has 2 entries, so the function must return a tuple"):
    f(jnp.zeros(()), jnp.zeros(3))


def test_linear_stack_scan_matches_manual_loop():
  """A small sanity check with plain Linear layers and per-step outputs."""
  @nnx.split_rngs(splits=3)
  @nnx.vmap
  def create(r):
    return Linear(EMBED, EMBED, rngs=r)

  stack = create(nnx.Rngs(7))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def step(x, lin):
    y = jnp.tanh(lin(x))
    return y, y

  x = jnp.ones((EMBED,))
  final, trail = step(x, stack)
  r = x
  for i in range(3):
    r = jnp.tanh(r @ stack.w.value[i] + stack.b.value[i])
    assert close(trail[i], r)
  assert close(final, r)


def test_error_step_changes_carry_structure():
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(c, x):
    return (c, c + x)

  with pytest.raises(errors.TransformError, match=r"the carry returned by the step has "
                     r"structure .* but the carry passed in has"):
    step(jnp.zeros(()), jnp.ones(3))


def test_error_carried_module_state_changes_shape():
  c = Counter()

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(m, x):
    m.count.value = jnp.zeros(2, dtype=jnp.int32) + m.count.value
    return m

  with pytest.raises(errors.TransformError, match=r"carried Module state changes shape or "
                     r"dtype across steps"):
    step(c, jnp.ones(3))
