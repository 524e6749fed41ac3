"""nnx.jit plan cache: one plan per instance for methods, weak, invalidated by structure."""

import gc

import jax.numpy as jnp
import numpy as np

import spmdnnx as nnx


class Counter(nnx.Module):

  def __init__(self, start=0):
    self.n = nnx.Variable(jnp.array(start))

  @nnx.jit
  def bump(self, k):
    self.n += k
    return self.n.value


def test_method_keeps_a_plan_per_instance():
  a, b = Counter(0), Counter(100)
  a.bump(1)
  b.bump(1)
  plan_a = Counter.bump._plans.get(a)
  plan_b = Counter.bump._plans.get(b)
  assert plan_a is not None and plan_b is not None and plan_a is not plan_b
  for _ in range(3):
    assert int(a.bump(1)) < 100
    assert int(b.bump(1)) > 100
  # Alternating did not re-plan: the same plan objects serve both.
  assert Counter.bump._plans.get(a) is plan_a
  assert Counter.bump._plans.get(b) is plan_b
  assert int(a.n.value) == 4 and int(b.n.value) == 104


def test_alternating_functions_arguments_keep_their_plans():
  f = nnx.jit(lambda m, x: m.n.value + x)
  a, b = Counter(1), Counter(2)
  f(a, 1)
  f(b, 1)
  plan_a, plan_b = f._plans.get(a), f._plans.get(b)
  for _ in range(2):
    assert int(f(a, 1)) == 2 and int(f(b, 1)) == 3
  assert f._plans.get(a) is plan_a and f._plans.get(b) is plan_b


def test_plans_do_not_keep_instances_alive():
  f = nnx.jit(lambda m: m.n.value * 2)
  c = Counter(3)
  f(c)
  assert len(f._plans) == 1
  del c
  gc.collect()
  assert len(f._plans) == 0
  assert f._plan is None


def test_structure_change_of_one_instance_replans_it():
  a, b = Counter(0), Counter(0)
  a.bump(1)
  b.bump(1)
  plan_a = Counter.bump._plans.get(a)
  a.extra = nnx.Variable(jnp.ones(2))   # structure changed: plans are stale
  a.bump(1)
  assert Counter.bump._plans.get(a) is not plan_a
  b.bump(1)
  assert int(a.n.value) == 2 and int(b.n.value) == 2


def test_alternating_variable_arguments():
  # Variables compare elementwise: they are never plan-map keys (not anchors).
  v = nnx.Param(jnp.zeros(3))
  w = nnx.Param(jnp.zeros(3))

  @nnx.jit
  def bump(p):
    p.value = p.value + 1

  for _ in range(2):
    bump(v)
    bump(w)
  np.testing.assert_array_equal(v.value, [2.0, 2.0, 2.0])
  np.testing.assert_array_equal(w.value, [2.0, 2.0, 2.0])
