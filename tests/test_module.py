"""Tests for spmdnnx._module: attributes, sow/pop, iteration, modes, repr, copies."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Dropout(nnx.Module):

  def __init__(self, rate, *, rngs):
    self.rate = rate
    self.deterministic = False
    self.rngs = rngs

  def __call__(self, x):
    if self.deterministic or self.rate == 0:
      return x
    keep = jax.random.bernoulli(self.rngs.dropout(), 1 - self.rate, x.shape)
    return jnp.where(keep, x / (1 - self.rate), 0)


class Norm(nnx.Module):

  def __init__(self):
    self.mean = nnx.BatchStat(jnp.zeros(2))
    self.use_running_average = False


class Block(nnx.Module):

  def __init__(self, *, rngs):
    self.w = nnx.Param(jnp.ones((2, 2)))
    self.drop = Dropout(0.5, rngs=rngs)
    self.norm = Norm()
    self.children_list = [Norm(), Dropout(0.1, rngs=rngs)]
    self.raw = jnp.zeros(2)
    self.act = "relu"

  def __call__(self, x):
    h = x @ self.w
    self.sow(nnx.Intermediate, "hidden", h)
    return self.drop(h)


def test_attributes_of_all_kinds():
  m = Block(rngs=nnx.Rngs(0))
  assert type(m.w) is nnx.Param
  assert isinstance(m.drop, nnx.Module)
  assert isinstance(m.children_list, list) and len(m.children_list) == 2
  assert isinstance(m.raw, jax.Array)
  assert m.act == "relu"
  m.act = "gelu"
  assert m.act == "gelu"
  m.extra = None
  assert m.extra is None
  del m.extra
  assert not hasattr(m, "extra")


def test_attribute_set_to_none_is_stored():
  m = nnx.Module()
  m.cache = None
  assert "cache" in vars(m) and m.cache is None


def test_replacing_a_variable_with_a_variable_rebinds():
  m = Block(rngs=nnx.Rngs(0))
  old = m.w
  m.w = nnx.Param(jnp.zeros((2, 2)))
  assert m.w is not old
  np.testing.assert_array_equal(old.value, np.ones((2, 2)))


def test_module_call_uses_reference_semantics():
  m = Block(rngs=nnx.Rngs(0))
  alias = m.norm
  alias.mean.value = jnp.ones(2)
  np.testing.assert_array_equal(m.norm.mean.value, [1.0, 1.0])


def test_sow_collects_tuple_and_pop():
  m = Block(rngs=nnx.Rngs(0))
  m.drop.deterministic = True
  m(jnp.ones((1, 2)))
  m(jnp.zeros((1, 2)))
  assert type(m.hidden) is nnx.Intermediate
  assert len(m.hidden.value) == 2
  np.testing.assert_array_equal(m.hidden.value[0], [[2.0, 2.0]])
  inters = nnx.state(m, nnx.Intermediate)
  assert [p for p, _ in inters.flat_state()] == [("hidden",)]
  popped = nnx.pop(m, nnx.Intermediate)
  assert len(popped["hidden"].value) == 2
  assert not hasattr(m, "hidden")
  m(jnp.ones((1, 2)))
  assert len(m.hidden.value) == 1  # starts afresh after pop


def test_sow_custom_reduce_and_init():
  m = nnx.Module()
  for i in range(3):
    m.sow(nnx.Intermediate, "total", jnp.array(i), reduce_fn=lambda a, b: a + b,
          init_fn=lambda: jnp.array(0))
  assert int(m.total.value) == 3


def test_sow_custom_variable_type_and_string():

  class Stat(nnx.Intermediate):
    pass

  m = nnx.Module()
  m.sow(Stat, "s", 1.0)
  assert type(m.s) is Stat and m.s.value == (1.0,)
  m.sow("intermediates", "t", 2.0)
  assert type(m.t) is nnx.Intermediate


def test_sow_name_clash_error():
  m = Block(rngs=nnx.Rngs(0))
  with pytest.raises(errors.GraphError,
                     match=r"sow: expected attribute 'w' of Block to be of type "
                     r"Intermediate, got Param; sow into another name"):
    m.sow(nnx.Intermediate, "w", jnp.ones(1))
  m.n = 3
  with pytest.raises(errors.GraphError, match=r"attribute 'n' of Block to be a Variable, got int"):
    m.sow(nnx.Intermediate, "n", jnp.ones(1))


def test_capture_returns_sown_values_and_leaves_nothing_behind():

  class Inner(nnx.Module):

    def __call__(self, x):
      x = self.perturb("dx", x)
      self.sow(nnx.Intermediate, "h", x * 2)
      return x * 3

  class Outer(nnx.Module):

    def __init__(self):
      self.inner = Inner()

    def __call__(self, x):
      return self.inner(x) + 1

  m = Outer()
  y, inter, pert = nnx.capture(m, nnx.Intermediate, nnx.Perturbation)(jnp.ones(2))
  np.testing.assert_allclose(y, 4.0)
  np.testing.assert_allclose(inter["inner"]["h"].value[0], 2.0)
  assert float(pert["inner"]["dx"].value.sum()) == 0.0
  assert "__captures__" not in vars(m.inner) and "h" not in vars(m.inner)
  # init= seeds the perturbation: it is added to the value.
  seeded = jax.tree.map(lambda v: v + 1, pert)
  y2, _ = nnx.capture(m, nnx.Intermediate, init=seeded)(jnp.ones(2))
  np.testing.assert_allclose(y2, 7.0)
  # Types only: a decorator; sow of an uncaptured type records nothing.
  assert nnx.capture(nnx.Perturbation)(lambda mod, x: mod(x))(m, jnp.ones(2))[1]["inner"]


def test_capture_method_outputs():

  class Foo(nnx.Module):

    def helper(self, x):
      return x + 1

    def __call__(self, x):
      return self.helper(x) * 2

  m = Foo()
  y, inter = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(jnp.ones(1))
  assert set(inter) == {"helper", "__call__"}
  assert Foo.helper.__name__ == "helper" and not hasattr(Foo.helper, "__wrapped__")


def test_sowed_values_through_split_merge():
  m = Block(rngs=nnx.Rngs(0))
  m(jnp.ones((1, 2)))
  g, s = nnx.split(m)
  m2 = nnx.merge(g, s)
  assert type(m2.hidden) is nnx.Intermediate and len(m2.hidden.value) == 1


def test_perturb_reads_activation_gradients():

  class Model(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.array(3.0))

    def __call__(self, x):
      h = self.perturb("h", x * self.w)
      return (h ** 2).sum()

  m = Model()
  m(jnp.ones(2))  # creates the zero perturbation
  assert type(m.h) is nnx.Perturbation
  grads = nnx.grad(lambda m, x: m(x), wrt=nnx.Perturbation)(m, jnp.ones(2))
  np.testing.assert_allclose(grads["h"].value, [6.0, 6.0])  # d(h^2)/dh = 2h


def test_iter_modules():
  m = Block(rngs=nnx.Rngs(0))
  got = [(p, type(n).__name__) for p, n in m.iter_modules()]
  # Attributes in name order (as Flax NNX), children first.
  assert got == [(("children_list", 0), "Norm"), (("children_list", 1), "Dropout"),
                 (("drop",), "Dropout"), (("norm",), "Norm"), ((), "Block")]
  assert [n for n, _ in m.iter_children()] == ["drop", "norm"]


def test_iter_modules_shared_once():
  m = Block(rngs=nnx.Rngs(0))
  m.norm_alias = m.norm
  norms = [n for _, n in m.iter_modules() if n is m.norm]
  assert len(norms) == 1


def test_set_attributes_everywhere_and_filtered():
  m = Block(rngs=nnx.Rngs(0))
  m.set_attributes(deterministic=True)
  assert m.drop.deterministic and m.children_list[1].deterministic
  m.set_attributes(Dropout, rate=0.0)
  assert m.drop.rate == 0.0 and m.children_list[1].rate == 0.0
  m.set_attributes(nnx.PathContains("children_list"), use_running_average=True)
  assert m.children_list[0].use_running_average is True
  assert m.norm.use_running_average is False


def test_set_attributes_not_found_error():
  m = Block(rngs=nnx.Rngs(0))
  with pytest.raises(errors.GraphError,
                     match=r"set_attributes: no Module in Block has attribute\(s\) "
                     r"\['determinstic'\]; check the spelling or pass "
                     r"raise_if_not_found=False"):
    m.set_attributes(determinstic=True)
  m.set_attributes(determinstic=True, raise_if_not_found=False)
  assert not hasattr(m.drop, "determinstic")


def test_train_and_eval():
  m = Block(rngs=nnx.Rngs(0))
  m.eval()
  assert m.drop.deterministic is True and m.children_list[1].deterministic is True
  assert m.norm.use_running_average is True
  x = jnp.ones((2, 2))
  np.testing.assert_array_equal(m(x), x @ m.w.value)
  m.train()
  assert m.drop.deterministic is False and m.norm.use_running_average is False
  assert not hasattr(m, "use_running_average")  # only set where it already exists


def test_train_eval_change_graphdef():
  m = Block(rngs=nnx.Rngs(0))
  g_train = nnx.graphdef(m)
  m.eval()
  assert nnx.graphdef(m) != g_train
  m.train()
  assert nnx.graphdef(m) == g_train


def test_repr_is_readable_tree():
  m = Norm()
  assert repr(m) == (
      "Norm(  # BatchStat: 2 (8 B)\n"
      "  mean=BatchStat(value=Array([0., 0.], dtype=float32)),\n"
      "  use_running_average=False,\n"
      ")")
  assert repr(nnx.Module()) == "Module()"


def test_repr_shared_and_cycles():
  m = nnx.Module()
  m.a = Norm()
  m.b = m.a
  m.me = m
  text = repr(m)
  assert "b=<shared Norm>" in text
  assert "me=<shared Module>" in text


def test_repr_lists_of_modules():
  m = nnx.Module()
  m.layers = [Norm()]
  assert "layers=[\n    Norm(" in repr(m)


def test_deepcopy_is_clone():
  m = Block(rngs=nnx.Rngs(0))
  m.alias = m.w
  c = copy.deepcopy(m)
  assert type(c) is Block and c is not m
  assert c.w is not m.w and c.alias is c.w
  np.testing.assert_array_equal(c.w.value, m.w.value)
  c.w.value = jnp.zeros((2, 2))
  np.testing.assert_array_equal(m.w.value, np.ones((2, 2)))


def test_display_prints(capsys):
  nnx.display(Norm())
  out = capsys.readouterr().out
  assert out.startswith("Norm(  # BatchStat: 2 (8 B)\n  mean=BatchStat(")


def test_repr_header_counts_each_variable_type():
  m = nnx.Module()
  m.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  m.bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  m.rngs = nnx.Rngs(0)
  first = repr(m).splitlines()[0]
  # Param: 3*2 + 2 (+ BatchNorm's 2 + 2); BatchStat: 2 + 2; RngState: key and count.
  assert first.startswith("Module(  # Param: 12 (48 B), BatchStat: 4 (16 B), RngState: 2")
  assert "Total: 18 " in first
  assert repr(m.lin).splitlines()[0] == "Linear(  # Param: 8 (32 B)"  # one type: no total


def test_pytree_nodes_and_state_attributes():
  m = Block(rngs=nnx.Rngs(0))
  m.name = "blk"
  nodes = m._pytree__nodes
  assert nodes["w"] is True and nodes["name"] is False
  assert m._pytree__state.initializing is False
  assert m._pytree__state.trace is None
