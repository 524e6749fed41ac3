"""Tests for spmdnnx._state: nested access, flat views, filtering, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Count(nnx.Variable):
  pass


def make_state():
  return nnx.State({
      "linear": {
          "kernel": nnx.Param(jnp.ones((2, 3)), logical_axes=("embed", "mlp")),
          "bias": nnx.Param(jnp.zeros(3)),
      },
      "bn": {"mean": nnx.BatchStat(jnp.zeros(3)), "var": nnx.BatchStat(jnp.ones(3))},
      "count": Count(jnp.array(0)),
      "layers": {0: {"w": nnx.Param(jnp.ones(1))}, 1: {"w": nnx.Param(jnp.full(1, 2.0))}},
  })


def test_nested_access_by_item_and_attribute():
  s = make_state()
  assert s["linear"]["kernel"] is s.linear.kernel
  assert type(s.linear) is nnx.State
  assert s.linear.kernel.logical_axes == ("embed", "mlp")
  assert float(s["layers"][1]["w"].value[0]) == 2.0
  assert set(s) == {"linear", "bn", "count", "layers"}
  assert len(s) == 4
  assert "bn" in s


def test_nested_plain_dicts_become_states():
  s = nnx.State({"a": {"b": {"c": jnp.ones(1)}}})
  assert type(s["a"]) is nnx.State and type(s["a"]["b"]) is nnx.State
  s["d"] = {"e": jnp.zeros(1)}
  assert type(s.d) is nnx.State


def test_set_and_delete_items_and_attributes():
  s = make_state()
  s.extra = nnx.Param(jnp.ones(1))
  assert "extra" in s
  s["other"] = jnp.zeros(2)
  del s["count"]
  assert "count" not in s
  assert set(s) == {"linear", "bn", "layers", "extra", "other"}


def test_missing_attribute_lists_keys():
  s = make_state()
  with pytest.raises(AttributeError,
                     match=r"State has no key 'nope'; keys are \['bn', 'count', 'layers', "
                     r"'linear'\]"):
    s.nope  # noqa: B018
  with pytest.raises(KeyError):
    s["nope"]  # noqa: B018


def test_flat_state_sorted_paths():
  s = make_state()
  flat = s.flat_state()
  assert flat.paths == (
      ("bn", "mean"), ("bn", "var"), ("count",), ("layers", 0, "w"), ("layers", 1, "w"),
      ("linear", "bias"), ("linear", "kernel"))
  assert len(flat) == 7
  assert flat[2][1] is s["count"]
  assert flat.leaves[2] is s["count"]


def test_int_keys_sort_numerically_before_strings():
  s = nnx.State({10: jnp.ones(1), 2: jnp.ones(1), "a": jnp.ones(1)})
  assert s.flat_state().paths == ((2,), (10,), ("a",))


def test_flat_state_round_trip():
  s = make_state()
  back = nnx.State.from_flat_path(s.flat_state())
  assert back == s
  back2 = s.flat_state().to_nested_state()
  assert back2 == s
  assert back2["linear"]["kernel"] is s["linear"]["kernel"]
  from_dict = nnx.State.from_flat_path(dict(s.flat_state()))
  assert from_dict == s


def test_from_flat_path_root_leaf_is_the_state_of_a_bare_variable():
  v = nnx.Param(jnp.ones(1))
  assert nnx.State.from_flat_path([((), v)]) is v
  graphdef, state = nnx.split(v)
  back = nnx.merge(graphdef, nnx.State.from_flat_path([((), state)]))
  assert isinstance(back, nnx.Param)
  np.testing.assert_array_equal(back[...], [1.0])


def test_from_flat_path_errors():
  with pytest.raises(errors.GraphError, match="A State leaf needs a non-empty path"):
    nnx.State.from_flat_path([((), jnp.ones(1)), (("a",), 1)])
  with pytest.raises(errors.GraphError,
                     match=r"Path a/b goes through a leaf at 'a'; paths must not be "
                     r"prefixes of each other"):
    nnx.State.from_flat_path([(("a",), 1), (("a", "b"), 2)])


def test_from_flat_path_prefix_error_either_order():
  with pytest.raises(errors.GraphError, match=r"paths must not be prefixes of each other"):
    nnx.State.from_flat_path([(("a", "b"), 2), (("a",), 1)])


def test_filter():
  s = make_state()
  params = s.filter(nnx.Param)
  assert [p for p, _ in params.flat_state()] == [
      ("layers", 0, "w"), ("layers", 1, "w"), ("linear", "bias"), ("linear", "kernel")]
  stats, counts = s.filter(nnx.BatchStat, Count)
  assert stats.flat_state().paths == (("bn", "mean"), ("bn", "var"))
  assert counts.flat_state().paths == (("count",),)
  assert s.filter(nnx.Cache) == nnx.State({})
  # First matching filter wins: a Param is not repeated in a later bucket.
  a, b = s.filter(nnx.PathContains("linear"), nnx.Param)
  assert b.flat_state().paths == (("layers", 0, "w"), ("layers", 1, "w"))


def test_filter_needs_a_filter():
  with pytest.raises(errors.FilterError, match="State.filter needs at least one filter"):
    make_state().filter()


def test_split_and_merge():
  s = make_state()
  params, rest = s.split(nnx.Param, ...)
  assert len(params.flat_state()) == 4 and len(rest.flat_state()) == 3
  merged = nnx.State.merge(params, rest)
  assert merged == s
  assert (params | rest) == s
  assert s.split(...) == s
  assert s.split() == s


def test_merge_later_wins():
  a = nnx.State({"x": jnp.ones(1), "y": jnp.ones(1)})
  b = nnx.State({"x": jnp.zeros(1)})
  merged = nnx.State.merge(a, b)
  np.testing.assert_array_equal(merged["x"], [0.0])
  np.testing.assert_array_equal(merged["y"], [1.0])


def test_split_not_exhaustive_lists_paths_and_suggests_ellipsis():
  s = make_state()
  with pytest.raises(errors.FilterError,
                     match=r"^Non-exhaustive filters, got a non-empty remainder: filters "
                     r".* are not exhaustive: 3 state leaves match none of them: "
                     r"bn/mean \(BatchStat\), bn/var \(BatchStat\), count \(Count\)\. "
                     r"Add '\.\.\.' as the last filter to collect the rest\."):
    s.split(nnx.Param)


def test_split_not_exhaustive_caps_listing():
  s = nnx.State({f"b{i:02d}": nnx.BatchStat(jnp.zeros(1)) for i in range(13)})
  with pytest.raises(errors.FilterError,
                     match=r"13 state leaves match none of them: b00 \(BatchStat\), .*"
                     r"b09 \(BatchStat\) \(and 3 more\)\."):
    s.split(nnx.Param)


def test_flat_state_filter_and_split():
  flat = make_state().flat_state()
  params = flat.filter(nnx.Param)
  assert isinstance(params, nnx.FlatState) and len(params) == 4
  p, rest = flat.split(nnx.Param, ...)
  assert len(p) == 4 and len(rest) == 3
  with pytest.raises(errors.FilterError, match="not exhaustive"):
    flat.split(nnx.Param)


def test_to_pure_dict_and_replace_by_pure_dict():
  s = make_state()
  pure = s.to_pure_dict()
  assert type(pure) is dict and type(pure["linear"]) is dict
  assert isinstance(pure["linear"]["kernel"], jax.Array)
  assert set(pure["layers"]) == {0, 1}
  new = jax.tree.map(lambda x: x + 1, pure)
  s.replace_by_pure_dict(new)
  np.testing.assert_array_equal(s.linear.kernel.value, np.full((2, 3), 2.0))
  assert type(s.linear.kernel) is nnx.Param
  assert s.linear.kernel.logical_axes == ("embed", "mlp")
  assert int(s.count.value) == 1 and type(s.count) is Count


def test_replace_by_pure_dict_string_int_keys_and_replace_fn():
  s = make_state()
  s.replace_by_pure_dict({"layers": {"0": {"w": jnp.full(1, 5.0)}}})
  np.testing.assert_array_equal(s.layers[0].w.value, [5.0])
  s.replace_by_pure_dict({"count": jnp.array(4)}, replace_fn=lambda var, v: v * 2)
  assert int(s.count.value) == 8


def test_replace_by_pure_dict_unknown_key_error():
  with pytest.raises(errors.GraphError,
                     match=r"replace_by_pure_dict: key 'zz' is not in this State "
                     r"\(keys: \['bn', 'count', 'layers', 'linear'\]\)"):
    make_state().replace_by_pure_dict({"zz": jnp.ones(1)})


def test_tree_map_keeps_variable_types_and_metadata():
  s = make_state()
  out = jax.tree.map(lambda x: x * 0, s)
  assert type(out) is nnx.State
  assert type(out.count) is Count
  assert type(out.bn.mean) is nnx.BatchStat
  assert out.linear.kernel.logical_axes == ("embed", "mlp")
  np.testing.assert_array_equal(out.linear.kernel.value, np.zeros((2, 3)))
  assert out is not s and s.linear.kernel.value.sum() == 6


def test_tree_leaves_are_raw_values():
  s = make_state()
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 7
  assert all(isinstance(x, jax.Array) for x in leaves)


def test_tree_flatten_with_path_keys():
  s = make_state()
  keyed, _ = jax.tree_util.tree_flatten_with_path(s)
  keys = [jax.tree_util.keystr(k) for k, _ in keyed]
  assert keys == [
      "['bn']['mean'].value", "['bn']['var'].value", "['count'].value",
      "['layers'][0]['w'].value", "['layers'][1]['w'].value",
      "['linear']['bias'].value", "['linear']['kernel'].value"]


def test_raw_array_leaves_flatten_without_value_key():
  s = nnx.State({"a": jnp.ones(2)})
  keyed, _ = jax.tree_util.tree_flatten_with_path(s)
  assert jax.tree_util.keystr(keyed[0][0]) == "['a']"


def test_state_through_jax_jit():
  s = make_state()

  @jax.jit
  def f(state):
    return jax.tree.map(lambda x: x + 1, state)

  out = f(s)
  assert type(out) is nnx.State
  assert type(out.count) is Count
  assert int(out.count.value) == 1
  assert out.linear.kernel.logical_axes == ("embed", "mlp")


def test_equality():
  a = nnx.State({"x": 1, "y": {"z": 2}})
  assert a == {"x": 1, "y": {"z": 2}}
  assert a != nnx.State({"x": 1})
  with pytest.raises(TypeError):
    hash(a)


def test_repr_readable():
  s = nnx.State({"b": {"w": nnx.Param(jnp.array([1.0, 2.0]))}, "a": nnx.BatchStat(jnp.array(0, jnp.int32))})
  assert repr(s) == (
      "State({\n"
      "  'a': BatchStat(value=Array(0, dtype=int32)),\n"
      "  'b': State({\n"
      "    'w': Param(value=Array([1., 2.], dtype=float32)),\n"
      "  }),\n"
      "})")
  assert repr(nnx.State({})) == "State({})"


def test_from_flat_path_prefix_errors():
  with pytest.raises(errors.GraphError, match=r"Path a/b goes through a leaf at 'a'"):
    nnx.State.from_flat_path([(("a",), 1), (("a", "b"), 2)])
  with pytest.raises(errors.GraphError, match=r"Path a is a prefix of other paths in the State"):
    nnx.State.from_flat_path([(("a", "b"), 2), (("a",), 1)])
