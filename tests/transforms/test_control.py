"""Tests for spmdnnx._transforms.control: cond, switch, fori_loop, while_loop."""

import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from tx_models import Counter, RunningMean, close


class Two(nnx.Module):

  def __init__(self):
    self.a = Counter()
    self.b = Counter()


def inc_a(m, x):
  m.a.count += 1
  return x + 1.0


def inc_b(m, x):
  m.b.count += 10
  return x - 1.0


@pytest.mark.parametrize("pred, out, a, b", [(True, 3.0, 1, 0), (False, 1.0, 0, 10)])
def test_cond_updates_only_taken_branch_state(pred, out, a, b):
  m = Two()
  y = nnx.cond(pred, inc_a, inc_b, m, jnp.array(2.0))
  assert float(y) == out
  assert (int(m.a.count.value), int(m.b.count.value)) == (a, b)


def test_cond_under_jit_with_traced_predicate():
  m = Two()

  @nnx.jit
  def step(m, flag, x):
    return nnx.cond(flag, inc_a, inc_b, m, x)

  assert float(step(m, jnp.array(True), jnp.array(0.0))) == 1.0
  assert float(step(m, jnp.array(False), jnp.array(0.0))) == -1.0
  assert float(step(m, jnp.array(True), jnp.array(0.0))) == 1.0
  assert int(m.a.count.value) == 2
  assert int(m.b.count.value) == 10


def test_cond_returns_input_module():
  m = Two()
  out = nnx.cond(True, lambda m: m, lambda m: m, m)
  assert out is m


def test_cond_batchnorm_like_statistics():
  rm = RunningMean(2)
  x = jnp.array([[1.0, 3.0], [3.0, 5.0]])
  nnx.cond(jnp.array(True), lambda m, x: m(x), lambda m, x: x, rm, x)
  assert close(rm.mean.value, jnp.array([1.0, 2.0]))
  nnx.cond(jnp.array(False), lambda m, x: m(x), lambda m, x: x, rm, x)
  assert close(rm.mean.value, jnp.array([1.0, 2.0]))


@pytest.mark.parametrize("index, a, b", [(0, 1, 0), (1, 0, 10), (2, 0, 0)])
def test_switch_updates_only_taken_branch(index, a, b):
  m = Two()
  branches = [inc_a, inc_b, lambda m, x: x * 0.0]
  y = nnx.switch(index, branches, m, jnp.array(2.0))
  assert float(y) == [3.0, 1.0, 0.0][index]
  assert (int(m.a.count.value), int(m.b.count.value)) == (a, b)


def test_switch_under_jit():
  m = Two()

  @nnx.jit
  def step(m, i):
    return nnx.switch(i, [inc_a, inc_b], m, jnp.array(0.0))

  step(m, jnp.array(1))
  step(m, jnp.array(1))
  step(m, jnp.array(0))
  assert int(m.a.count.value) == 1 and int(m.b.count.value) == 20


def test_fori_loop_with_module_in_loop_value():
  m = Two()

  def body(i, val):
    m, total = val
    m.a.count += 1
    return m, total + i

  out_m, total = nnx.fori_loop(0, 5, body, (m, jnp.array(0)))
  assert out_m is m
  assert int(total) == 10
  assert int(m.a.count.value) == 5
  assert int(m.b.count.value) == 0


def test_fori_loop_under_jit():
  m = Two()

  @nnx.jit
  def run(m, n):
    return nnx.fori_loop(0, n, lambda i, m: (inc_b(m, 0.0), m)[1], m)

  run(m, jnp.array(3))
  assert int(m.b.count.value) == 30


def test_while_loop_with_module():
  c = Counter()

  def cond_fun(val):
    c, x = val
    return x < 100.0

  def body_fun(val):
    c, x = val
    c.count += 1
    return c, x * 2.0

  out_c, x = nnx.while_loop(cond_fun, body_fun, (c, jnp.array(3.0)))
  assert out_c is c
  assert float(x) == 192.0
  assert int(c.count.value) == 6


def test_while_loop_cond_sees_module_state():
  c = Counter()

  def body(c):
    c.count += 1
    return c

  nnx.while_loop(lambda c: c.count.value < 7, body, c)
  assert int(c.count.value) == 7


# --- errors --------------------------------------------------------------------------


def test_error_cond_branch_adds_variable():
  c = Counter()

  def grow(c):
    c.extra = nnx.Variable(jnp.array(1))

  with pytest.raises(errors.TransformError,
                     match=r"cond: .*grow added, removed or swapped Variables.*extra.*keep the graph"):
    nnx.cond(True, grow, lambda c: None, c)
  assert not hasattr(c, "extra")


def test_error_cond_branch_returns_new_module():
  with pytest.raises(errors.TransformError, match="cond: .* returned new graph objects"):
    nnx.cond(True, lambda c: Counter(), lambda c: Counter(), Counter())


def test_error_switch_without_branches():
  with pytest.raises(errors.TransformError, match="at least one branch"):
    nnx.switch(0, [], jnp.array(0.0))


def test_error_fori_loop_body_returns_other_object():
  c = Counter()
  with pytest.raises(errors.TransformError,
                     match=r"fori_loop\(.*<lambda>\): the body must return the same graph "
                           r"objects it received"):
    nnx.fori_loop(0, 3, lambda i, c: Counter(), c)


def test_error_fori_loop_body_changes_structure():
  c = Counter()
  with pytest.raises(errors.TransformError, match="returned a value with 1 leaves but the loop"):
    nnx.fori_loop(0, 3, lambda i, val: val[0], (c, jnp.array(0)))


def test_error_while_loop_body_adds_variable():
  c = Counter()

  def body(c):
    c.extra = nnx.Variable(jnp.array(0))
    return c

  with pytest.raises(errors.TransformError,
                     match=r"while_loop\(.*body\): the body added, removed or swapped Variables.*extra"):
    nnx.while_loop(lambda c: c.count.value < 3, body, c)
  assert not hasattr(c, "extra")


def test_cond_branches_returning_different_objects_error():
  class Pair(nnx.Module):
    def __init__(self):
      self.a = nnx.Variable(jnp.zeros(2))
      self.b = nnx.Variable(jnp.ones(2))

  with pytest.raises(nnx.errors.TransformError,
                     match=r"cond: the branches return different graph objects"):
    nnx.cond(True, lambda p: p.a, lambda p: p.b, Pair())


def test_switch_needs_a_branch():
  with pytest.raises(errors.TransformError, match=r"switch: needs at least one branch function"):
    nnx.switch(0, [], Counter())


class _Pair(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(2, 2, rngs=nnx.Rngs(1))


def _swap(m):
  m.a, m.b = m.b, m.a
  m.a.kernel[...] = m.a.kernel[...] + 1.0


@pytest.mark.parametrize("run", [
    lambda m: nnx.vmap(_swap, in_axes=None, out_axes=None, axis_size=2)(m),
    lambda m: nnx.remat(_swap)(m),
    lambda m: nnx.jit(_swap)(m),
])
def test_swapped_submodules_come_back_swapped(run):
  """A swap inside keeps each sub-module's identity and values (no write by position)."""
  m = _Pair()
  a, b = m.a, m.b
  ka, kb = a.kernel[...], b.kernel[...]
  run(m)
  assert m.a is b and m.b is a
  assert jnp.array_equal(a.kernel[...], ka) and jnp.array_equal(b.kernel[...], kb + 1.0)


@pytest.mark.parametrize("run, who", [
    (lambda m: nnx.cond(True, _swap, _swap, m), "cond"),
    (lambda m: nnx.scan(lambda m, x: (_swap(m), (m, x))[1], in_axes=(nnx.Carry, 0),
                        out_axes=(nnx.Carry, 0))(m, jnp.arange(2)), "scan"),
])
def test_swapped_submodules_in_branches_and_loops_are_refused(run, who):
  m = _Pair()
  a = m.a
  ka = a.kernel[...]
  with pytest.raises(errors.TransformError, match=rf"{who}.*added, removed or swapped Variables "
                                                  r"or sub-modules \(paths 0/a/bias"):
    run(m)
  assert m.a is a and jnp.array_equal(a.kernel[...], ka)  # nothing written back
