"""One graph walker: every traversal sees nodes inside registered pytrees.

Regression tests for issue 9 item 6 (`iter_graph` skipped dataclasses and
namedtuples that `split` walks) and item 8 (`nnx.variables`), and the typed
GraphDef node specs.
"""

import dataclasses
import doctest
import typing

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import _graphdef
from spmdnnx import errors


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Holder:
  inner: typing.Any
  size: int = dataclasses.field(default=2, metadata=dict(static=True))


class Pair(typing.NamedTuple):
  first: typing.Any
  second: typing.Any


class Leaf(nnx.Module):

  def __init__(self, seed: int, rngs: nnx.Rngs | None = None):
    self.w = nnx.Param(jnp.full((2,), float(seed)))
    if rngs is not None:
      self.rngs = rngs


class Outer(nnx.Module):

  def __init__(self):
    self.holder = Holder(Leaf(1, nnx.Rngs(dropout=0)))
    self.pair = Pair(Leaf(2), Leaf(3))
    self.top = Leaf(4)


def _paths(items):
  return {p for p, _ in items}


def test_iter_graph_descends_into_dataclass_and_namedtuple():
  m = Outer()
  found = {p: v for p, v in nnx.iter_graph(m)}
  assert found[("holder", "inner")] is m.holder.inner
  assert found[("holder", "inner", "w")] is m.holder.inner.w
  assert found[("pair", "first")] is m.pair.first
  assert found[("pair", "second", "w")] is m.pair.second.w
  # The same positions split() sees (every Variable path is yielded).
  state_paths = {p for p, _ in nnx.state(m).flat_state()}
  var_paths = {p for p, v in nnx.iter_graph(m) if isinstance(v, nnx.Variable)}
  assert var_paths == state_paths


def test_iter_graph_yields_children_before_parents_and_shared_once():
  shared = Leaf(5)
  m = nnx.Module()
  m.a = Holder(shared)
  m.b = Pair(shared, Leaf(6))
  items = list(nnx.iter_graph(m))
  order = [p for p, _ in items]
  assert order.index(("a", "inner", "w")) < order.index(("a", "inner"))
  assert order.index(("a", "inner")) < order.index(("a",)) < order.index(())
  assert sum(v is shared for _, v in items) == 1
  assert ("b", "first") not in order  # the second reference is not repeated


def test_iter_modules_sees_modules_in_pytrees():
  m = Outer()
  mods = dict(m.iter_modules())
  assert mods[("holder", "inner")] is m.holder.inner
  assert mods[("pair", "second")] is m.pair.second
  assert len(mods) == 5


def test_reseed_reaches_rngs_in_a_dataclass():
  m = Outer()
  stream = m.holder.inner.rngs.dropout
  before = stream()
  nnx.reseed(m, dropout=7)
  assert int(stream.count.value) == 0
  after = stream()
  assert not jnp.array_equal(jax.random.key_data(after), jax.random.key_data(before))
  nnx.reseed(m, dropout=7)  # the same seed replays the same keys
  assert jnp.array_equal(jax.random.key_data(stream()), jax.random.key_data(after))


def test_split_rngs_splits_rngs_in_a_dataclass_attribute():
  m = Outer()
  stream = m.holder.inner.rngs.dropout
  with nnx.split_rngs(m, splits=3):
    assert stream.key.value.shape == (3,)
  assert stream.key.value.shape == ()


def test_update_writes_variables_inside_pytrees():
  m = Outer()
  state = nnx.state(m)
  state["holder"]["inner"]["w"] = nnx.Param(jnp.zeros(2))
  state["pair"]["second"]["w"] = nnx.Param(jnp.full((2,), 9.0))
  nnx.update(m, state)
  assert m.holder.inner.w.value.tolist() == [0.0, 0.0]
  assert m.pair.second.w.value.tolist() == [9.0, 9.0]


def test_update_cannot_add_to_an_immutable_pytree():
  m = Outer()
  bad = nnx.State({"pair": {"extra": nnx.Param(jnp.ones(1))}})
  with pytest.raises(errors.GraphError, match=r"cannot set pair/extra inside a Pair "
                     r"\(immutable\)") as info:
    nnx.update(m, bad)
  assert info.value.paths == [("pair", "extra")]


def test_pop_from_an_immutable_pytree_error():
  m = nnx.Module()
  m.pair = Pair(nnx.Intermediate(jnp.ones(1)), Leaf(0))
  with pytest.raises(errors.GraphError, match=r"pop: cannot remove pair/first from an "
                     r"immutable Pair"):
    nnx.pop(m, nnx.Intermediate)


def test_pop_reaches_a_module_inside_a_dataclass():
  m = Outer()
  m.holder.inner.sow(nnx.Intermediate, "seen", jnp.ones(1))
  popped = nnx.pop(m, nnx.Intermediate)
  assert [p for p, _ in popped.flat_state()] == [("holder", "inner", "seen")]
  assert "seen" not in vars(m.holder.inner)


def test_jit_returns_the_input_module_from_inside_a_dataclass():
  m = Outer()

  @nnx.jit
  def pick(model):
    return model.holder.inner, model.pair.second

  inner, second = pick(m)
  assert inner is m.holder.inner
  assert second is m.pair.second


def test_vmap_returns_the_input_module_from_inside_a_dataclass():
  m = Outer()

  @nnx.vmap(in_axes=None, out_axes=None, axis_size=2)
  def pick(model):
    return model.holder.inner

  assert pick(m) is m.holder.inner


def test_iter_graph_names_namedtuple_children_like_split():
  m = nnx.Module()
  m.pair = Pair(Leaf(1), Leaf(2))
  assert ("pair", "first", "w") in _paths(nnx.iter_graph(m))
  assert ("pair", 0, "w") not in _paths(nnx.iter_graph(m))


def test_jit_updates_reach_modules_inside_pytrees():
  m = Outer()

  @nnx.jit
  def bump(model):
    model.holder.inner.w.value = model.holder.inner.w.value + 1
    model.pair.first.w.value = model.pair.first.w.value * 10

  bump(m)
  assert m.holder.inner.w.value.tolist() == [2.0, 2.0]
  assert m.pair.first.w.value.tolist() == [20.0, 20.0]


# --- typed GraphDef specs -----------------------------------------------------


def test_graphdef_specs_are_typed_records():
  m = Outer()
  m.z_alias = m.top  # after "top" in name order: the second reference
  gd = nnx.graphdef(m)
  root = gd.spec
  assert isinstance(root, _graphdef.NodeSpec) and root.type is Outer and root.index == 0
  children = dict(root.children)
  assert isinstance(children["holder"], _graphdef.PytreeSpec)
  assert children["holder"].keys == ("inner",)
  top = dict(children["top"].children)["w"]
  assert isinstance(top, _graphdef.VariableSpec) and top.type is nnx.Param
  assert children["z_alias"] == _graphdef.RefSpec(children["top"].index)
  assert isinstance(children["pair"], _graphdef.PytreeSpec)
  assert children["pair"].keys == ("first", "second")


def test_spec_kinds_never_compare_equal_across_kinds():
  assert _graphdef.RefSpec(3) != (3,)
  assert _graphdef.ArraySpec() != ()
  assert _graphdef.RefSpec(3) == _graphdef.RefSpec(3)
  assert hash(_graphdef.RefSpec(3)) == hash(_graphdef.RefSpec(3))
  assert _graphdef.NodeSpec(tuple, None, ()) != _graphdef.PytreeSpec(tuple, None, ())


def test_graphdef_equal_and_hash_equal_for_equal_structures_with_pytrees():
  a, b = Outer(), Outer()
  ga, gb = nnx.graphdef(a), nnx.graphdef(b)
  assert ga == gb and hash(ga) == hash(gb)
  b.holder = Holder(Leaf(1, nnx.Rngs(dropout=0)), size=3)  # static field differs
  assert nnx.graphdef(b) != ga


def test_merge_roundtrip_through_pytrees_keeps_types_and_static_fields():
  m = Outer()
  copy = nnx.merge(*nnx.split(m))
  assert isinstance(copy.holder, Holder) and copy.holder.size == 2
  assert isinstance(copy.pair, Pair)
  assert copy.pair.second.w.value.tolist() == [3.0, 3.0]
  assert copy.pair.second is not m.pair.second


def test_corrupt_graphdef_error():
  gd = nnx.GraphDef(_graphdef.NodeSpec(nnx.Module, 0, (("x", "not a spec"),)))
  with pytest.raises(errors.GraphError, match=r"Corrupt GraphDef spec at x: 'not a spec'"):
    nnx.merge(gd, nnx.State({}))


def test_graphdef_module_doctests():
  result = doctest.testmod(_graphdef)
  assert result.attempted > 0 and result.failed == 0


# --- nnx.variables ---------------------------------------------------------------


def test_variables_returns_the_live_variables():
  m = Outer()
  params = nnx.variables(m, nnx.Param)
  assert params["top"]["w"] is m.top.w
  params["top"]["w"].value = jnp.full((2,), 42.0)
  assert m.top.w.value.tolist() == [42.0, 42.0]
  assert params["holder"]["inner"]["w"] is m.holder.inner.w


def test_variables_without_filter_and_with_several_filters():
  m = Outer()
  everything = nnx.variables(m)
  assert {p for p, _ in everything.flat_state()} == \
      {p for p, _ in nnx.state(m).flat_state()}
  params, rng = nnx.variables(m, nnx.Param, nnx.RngState)
  assert all(isinstance(v, nnx.Param) for _, v in params.flat_state())
  assert {p[-1] for p, _ in rng.flat_state()} == {"key", "count"}
  # nnx.state gives the live Variables too (Flax 0.12).
  nnx.state(m, nnx.Param)["top"]["w"].value = jnp.zeros(2)
  assert m.top.w.value.tolist() == [0.0, 0.0]


def test_merge_mismatch_error_carries_the_paths():
  gd, state = nnx.split(Leaf(0))
  state["extra"] = nnx.Param(jnp.ones(1))
  del state["w"]
  with pytest.raises(errors.GraphError, match=r"missing 1 path\(s\) the GraphDef needs: w; "
                     r"1 path\(s\) the GraphDef does not have: extra") as info:
    nnx.merge(gd, state)
  assert info.value.paths == [("w",), ("extra",)]


def test_update_through_a_missing_node_error_carries_the_path():
  with pytest.raises(errors.GraphError, match=r"update: path nope/w does not exist in the "
                     r"graph \(no nope\)") as info:
    nnx.update(Leaf(0), nnx.State({"nope": {"w": nnx.Param(jnp.ones(1))}}))
  assert info.value.paths == [("nope", "w")]
