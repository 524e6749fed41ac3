"""Tree mode (graph=False), Objects as pytrees, data/static markers, live-Variable States."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Block(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(2, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)
    self.depth = 1

  def __call__(self, x):
    return self.bn(self.lin(x))


def paths(state):
  return [p for p, _ in state.flat_state()]


# --- Modules as pytrees ------------------------------------------------------------


def test_module_is_a_pytree_of_its_arrays():
  m = Block(nnx.Rngs(0))
  leaves = jax.tree.leaves(m)
  assert len(leaves) == 6  # kernel, bias, scale, bias, mean, var
  doubled = jax.tree.map(lambda x: x * 2, m)
  assert type(doubled) is Block and doubled is not m
  np.testing.assert_allclose(doubled.lin.kernel.value, m.lin.kernel.value * 2)
  assert doubled.depth == 1 and doubled.lin.kernel.logical_axes == m.lin.kernel.logical_axes
  # The original is untouched; the new one has its own Variables.
  assert doubled.lin.kernel is not m.lin.kernel


def test_module_passes_through_plain_jax_jit():
  m = Block(nnx.Rngs(0))

  @jax.jit
  def f(m, x):
    return m.lin(x)

  np.testing.assert_allclose(f(m, jnp.ones((1, 2))), m.lin(jnp.ones((1, 2))), rtol=1e-6)


def test_pytree_false_object_is_a_jax_leaf_and_tree_mode_refuses_it():

  class Opaque(nnx.Module, pytree=False):

    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))

  o = Opaque()
  assert jax.tree.leaves(o) == [o]
  with pytest.raises(errors.GraphError, match="pytree=False.*Found at path w|pytree=False"):
    nnx.split({"w": o}, graph=False)
  # Graph mode still walks it.
  _, state = nnx.split(o)
  assert paths(state) == [("w",)]


def test_list_and_dict_containers_are_pytrees():
  lst = nnx.List([jnp.ones(1), jnp.zeros(2)])
  assert len(jax.tree.leaves(lst)) == 2
  out = jax.tree.map(lambda x: x + 1, lst)
  assert type(out) is nnx.List and out[1].tolist() == [1.0, 1.0]
  d = nnx.Dict(a=jnp.ones(1))
  assert type(jax.tree.map(lambda x: x, d)) is nnx.Dict


# --- data / static markers -----------------------------------------------------------


def test_data_and_static_markers_decide_pytree_children():

  class Foo(nnx.Pytree):

    def __init__(self):
      self.a = nnx.data(1)
      self.b = nnx.static(2)
      self.c = jnp.ones(())

  foo = Foo()
  assert jax.tree.leaves(foo) == [1, jnp.ones(())]
  foo.a = 5  # stays data: the marker sticks to the attribute
  assert jax.tree.leaves(foo)[0] == 5
  foo.c = nnx.static(7)
  assert jax.tree.leaves(foo) == [5]
  # Graph mode sees the same split: nnx.data(int) is a State leaf.
  _, state = nnx.split(foo)
  assert paths(state) == [("a",)]


def test_static_marker_refuses_data():

  class Foo(nnx.Pytree):

    def __init__(self):
      self.b = nnx.static(2)

  foo = Foo()
  with pytest.raises(errors.GraphError, match="Found data on value of type 'list'.*Foo.b"):
    foo.b = [jnp.ones(2)]
  with pytest.raises(errors.GraphError, match="Found data in value of type"):
    Foo().__setattr__("c", nnx.static(jnp.ones(1)))


def test_marker_takes_value_or_field_keywords_not_both():
  with pytest.raises(TypeError, match="either one positional value"):
    nnx.data(1, default=2)
  with pytest.raises(ValueError, match="must not contain the key 'static'"):
    nnx.static(metadata={"static": True})


def test_dataclass_fields_use_markers():

  @nnx.dataclass
  class Point(nnx.Pytree):
    x: jax.Array
    n: int = nnx.data(default=3)
    tag: str = nnx.static(default="p")

  p = Point(jnp.ones(2))
  leaves = jax.tree.leaves(p)
  assert len(leaves) == 2 and leaves[0] == 3 and p.tag == "p"  # name order: n, x
  assert dataclasses.is_dataclass(p)


def test_data_marker_survives_split_merge():

  class Foo(nnx.Module):

    def __init__(self):
      self.n = nnx.data(4)

  gd, state = nnx.split(Foo())
  foo = nnx.merge(gd, state)
  assert jax.tree.leaves(foo) == [4]


# --- tree mode -----------------------------------------------------------------------


def test_tree_mode_split_merge_equals_graph_mode():
  m = Block(nnx.Rngs(0))
  _, g_state = nnx.split(m, graph=True)
  t_gd, t_state = nnx.split(m, graph=False)
  assert paths(g_state) == paths(t_state)
  for (_, a), (_, b) in zip(g_state.flat_state(), t_state.flat_state()):
    assert a is b  # both modes give the live Variables
  m2 = nnx.merge(t_gd, t_state)
  assert type(m2) is Block and m2.lin.kernel is m.lin.kernel
  np.testing.assert_allclose(m2(jnp.ones((4, 2))), m(jnp.ones((4, 2))))


def test_tree_mode_filters_and_pure_dict_round_trip():
  m = Block(nnx.Rngs(0))
  gd, params, stats = nnx.split(m, nnx.Param, nnx.BatchStat, graph=False)
  assert ("bn", "mean") in paths(stats) and ("lin", "kernel") in paths(params)
  pure = nnx.to_pure_dict(params)
  pure["lin"]["kernel"] = jnp.zeros((2, 3))
  m2 = nnx.merge(gd, pure, stats)
  assert isinstance(m2.lin.kernel, nnx.Param) and float(m2.lin.kernel.value.sum()) == 0
  assert m2.lin.kernel.logical_axes == m.lin.kernel.logical_axes


def test_tree_mode_refuses_shared_variables_everywhere():
  p = nnx.Param(jnp.ones(2))
  shared = {"a": p, "b": p}
  for fn in (nnx.split, nnx.state, nnx.graphdef, nnx.clone):
    with pytest.raises(errors.GraphError, match="same Param found at paths a and b.*graph=True"):
      fn(shared, graph=False)
  with pytest.raises(errors.GraphError, match="found at paths a and b"):
    list(nnx.iter_graph(shared, graph=False))
  # Graph mode keeps the sharing.
  gd, state = nnx.split(shared, graph=True)
  out = nnx.merge(gd, state)
  assert out["a"] is out["b"]


def test_mode_setting_drives_the_default():
  p = nnx.Param(jnp.ones(2))
  shared = [p, p]
  with nnx.set_graph_mode(False):
    with pytest.raises(errors.GraphError, match="found at paths 0 and 1"):
      nnx.split(shared)
  assert len(nnx.state(shared).flat_state()) == 1


def test_iter_graph_tree_mode_children_first():
  m = Block(nnx.Rngs(0))
  items = list(nnx.iter_graph(m, graph=False))
  assert items[-1] == ((), m)
  found = {p for p, v in items if isinstance(v, nnx.Variable)}
  assert ("lin", "kernel") in found and ("bn", "mean") in found


def test_iter_children_both_modes():
  m = Block(nnx.Rngs(0))
  assert [k for k, _ in nnx.iter_children(m)] == ["bn", "lin"]
  assert [k for k, _ in nnx.iter_children(m, graph=False)] == ["bn", "lin"]


# --- Flax 0.12 identity semantics ---------------------------------------------------


def test_state_and_merge_share_variables_clone_does_not():
  m = Block(nnx.Rngs(0))
  gd, state = nnx.split(m)
  assert state["lin"]["kernel"] is m.lin.kernel
  m2 = nnx.merge(gd, state)
  assert m2.lin.kernel is m.lin.kernel
  c = nnx.clone(m)
  assert c.lin.kernel is not m.lin.kernel
  c2 = nnx.clone(m, arrays=True)
  assert c2.lin.kernel.value is not m.lin.kernel.value
  np.testing.assert_array_equal(c2.lin.kernel.value, m.lin.kernel.value)
  with pytest.raises(errors.GraphError, match="needs variables=True"):
    nnx.clone(m, variables=False, arrays=True)


def test_update_with_the_live_state_is_a_no_op_and_writes_values():
  m = Block(nnx.Rngs(0))
  state = nnx.state(m)
  nnx.update(m, state)
  new = jax.tree.map(jnp.zeros_like, nnx.state(m, nnx.Param))
  nnx.update(m, new)
  assert float(m.lin.kernel.value.sum()) == 0


def test_update_of_a_single_variable():
  v = nnx.Param(jnp.ones(2))
  nnx.update(v, nnx.State({}), nnx.Param(jnp.zeros(2)))
  assert v.value.tolist() == [0.0, 0.0]
  with pytest.raises(errors.GraphError, match="exactly one non-empty state"):
    nnx.update(v, nnx.Param(jnp.ones(2)), nnx.Param(jnp.ones(2)))


# --- unpack / map / call / recursive_map / find_duplicates ---------------------------


def test_unpack_bundles_graphdef_and_merges_alone():
  m = Block(nnx.Rngs(0))
  gs = nnx.unpack(m)
  assert gs.lin.kernel is m.lin.kernel
  params, rest = nnx.unpack(m, nnx.Param, ...)
  m2 = nnx.merge(params, rest)
  assert type(m2) is Block
  leaves = jax.tree.leaves(gs)
  assert len(leaves) == 6
  with pytest.raises(errors.GraphError, match="Expected GraphState object after a GraphState, got State"):
    nnx.merge(params, nnx.state(m))


def test_map_builds_a_new_graph():
  m = Block(nnx.Rngs(0))
  z = nnx.map(lambda p, v: v.replace(jnp.zeros_like(v.value)), m)
  assert float(z.lin.kernel.value.sum()) == 0 and float(abs(m.lin.kernel.value).sum()) > 0


def test_call_runs_a_method_purely_and_reaches_items():
  nodes = {"a": Block(nnx.Rngs(0)), "b": Block(nnx.Rngs(1))}
  pair = nnx.split(nodes)
  y, pair = nnx.call(pair)["b"](jnp.ones((4, 2)))
  assert y.shape == (4, 3)
  out = nnx.merge(*pair)
  assert set(out) == {"a", "b"}


def test_recursive_map_replaces_modules_and_keeps_input():
  seq = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.relu)

  def widen(path, x):
    return nnx.Linear(2, 5, rngs=nnx.Rngs(1)) if isinstance(x, nnx.Linear) else x

  out = nnx.recursive_map(widen, seq)
  assert out.layers[0].out_features == 5 and seq.layers[0].out_features == 2
  out_t = nnx.recursive_map(widen, seq, graph=False)
  assert out_t.layers[0].out_features == 5


def test_recursive_map_refuses_cycles():

  class Node(nnx.Module):
    pass

  n = Node()
  n.me = n
  with pytest.raises(errors.GraphError, match="cycle"):
    nnx.recursive_map(lambda p, x: x, n, graph=True)


def test_find_duplicates_lists_paths_of_shared_nodes():
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  m = nnx.Dict(a=lin, b=lin, c=nnx.Param(jnp.ones(1)))
  assert nnx.find_duplicates(m) == [[("a",), ("b",)]]
  assert nnx.find_duplicates(m, only=nnx.Param) == []


def test_set_metadata_and_to_flat_state():
  m = Block(nnx.Rngs(0))
  nnx.set_metadata(m, only=nnx.BatchStat, note=1)
  assert m.bn.mean.note == 1 and not hasattr(m.lin.kernel, "note")
  flat = nnx.to_flat_state(nnx.state(m))
  assert ("lin", "kernel") in flat.paths


def test_iter_modules_function():
  m = Block(nnx.Rngs(0))
  assert [p for p, _ in nnx.iter_modules(m)] == [("bn",), ("lin",), ()]


# --- smaller Flax 0.12 behaviours ---------------------------------------------------


def test_merge_without_state_is_a_type_error():
  gd, _ = nnx.split(Block(nnx.Rngs(0)))
  with pytest.raises(errors.ArgumentError, match=r"missing 1 required positional argument"):
    nnx.merge(gd)
  assert issubclass(errors.ArgumentError, TypeError)


def test_split_of_a_bare_leaf_gives_the_leaf_back():
  gd, state = nnx.split(42)
  assert state == 42 and nnx.merge(gd, state) == 42


def test_graph_state_flattens_like_its_state():
  m = Block(nnx.Rngs(0))
  gs = nnx.unpack(m)
  got = [p for p, _ in jax.tree_util.tree_flatten_with_path(gs)[0]]
  want = [p for p, _ in jax.tree_util.tree_flatten_with_path(gs.state)[0]]
  assert got == want and gs._graphdef is gs.graphdef


def test_map_without_recreating_variables_puts_raw_values():
  m = Block(nnx.Rngs(0))
  out = nnx.map(lambda p, v: v.value * 0, m, recreate_variables=False)
  assert not isinstance(out.lin.kernel, nnx.Variable)
  assert float(out.lin.kernel.sum()) == 0


def test_pure_state_and_graphdef_subscript_in_hints():

  def f(pair: nnx.PureState[Block], gd: nnx.GraphDef[Block]):
    return pair, gd

  assert f.__annotations__["gd"] is nnx.GraphDef


def test_dict_attribute_access_sets_items():
  d = nnx.Dict(a=1)
  d.b = nnx.Param(jnp.ones(1))
  assert d["b"] is d.b
  del d.a
  assert "a" not in d
  with pytest.raises(AttributeError):
    del d.zzz


def test_deepcopy_copies_static_values_and_arrays():
  import copy

  class Holder(nnx.Module):

    def __init__(self):
      self.sizes = (1, 2)
      self.names = ["a", "b"]
      self.w = nnx.Param(jnp.ones(2))

  h = Holder()
  h2 = copy.deepcopy(h)
  assert h2.names == h.names and h2.names is not h.names
  assert h2.w is not h.w


def test_view_sets_attributes_of_modules_without_set_view():
  d = nnx.Dropout(0.5, deterministic=False)
  out = nnx.view(d, deterministic=True)
  assert out.deterministic is True and d.deterministic is False


# --- split / merge / update contexts -------------------------------------------------


def test_split_context_shares_one_walk_and_merge_context_one_build():
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  seq = nnx.Sequential(lin)
  with nnx.split_context() as ctx:
    gd1, st1 = ctx.split(seq)
    gd2, st2 = ctx.split(lin)
  assert len(st1.flat_state()) == 2 and len(st2.flat_state()) == 0
  with nnx.merge_context() as ctx:
    a = ctx.merge(gd1, st1)
    b = ctx.merge(gd2, st2)
  assert b is a.layers[0]


def test_update_context_writes_inner_changes_into_the_originals():

  class Bar(nnx.Module):

    def __init__(self):
      self.x = 1

  class Foo(nnx.Module):

    def __init__(self):
      self.a = Bar()
      self.b = self.a
      self.w = nnx.Param(jnp.ones(2))

  m = Foo()
  w = m.w
  with nnx.update_context("t"):
    with nnx.split_context("t") as ctx:
      gd, st = ctx.split(m)

    @jax.jit
    def inner(gd, st):
      with nnx.merge_context("t", True) as ctx:
        m2 = ctx.merge(gd, st)
      m2.a.x = 2
      m2.c = Bar()
      m2.w.value = m2.w.value * 3
      with nnx.split_context("t") as ctx:
        return ctx.split(m2)

    gd, st = inner(gd, st)
    with nnx.merge_context("t", False) as ctx:
      out = ctx.merge(gd, st)
    assert nnx.current_update_context("t").tag == "t"
  assert out is m and m.w is w and m.w.value.tolist() == [3.0, 3.0]
  assert m.a.x == 2 and m.b is m.a and isinstance(m.c, Bar)
  with pytest.raises(errors.GraphError, match="No update context for tag 't' is open"):
    nnx.current_update_context("t")


def test_container_holding_itself_splits_and_merges():
  d = nnx.Dict(a=1)
  d.me = d
  gd, state = nnx.split(d)
  out = nnx.merge(gd, state)
  assert out["me"] is out and out["a"] == 1


def test_static_marker_messages_say_how_the_attribute_became_static():

  @nnx.dataclass
  class Foo(nnx.Pytree):
    s: int = nnx.static(default=0)

  with pytest.raises(errors.GraphError, match="Found unexpected data on value of type"):
    Foo(s=jnp.ones(1))


def test_tree_mode_refuses_a_shared_array_ref():
  ref = jax.new_ref(jnp.ones(1))
  with pytest.raises(errors.GraphError, match="same Ref found at paths 0 and 1"):
    nnx.split([ref, ref], graph=False)
