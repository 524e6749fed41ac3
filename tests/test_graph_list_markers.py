"""nnx.List items marked nnx.data / nnx.static, and plain lists/dicts as copies in graph mode."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


def test_static_items_are_not_leaves_and_data_items_are():
  xs = nnx.List([nnx.data(1), nnx.static("tag"), jnp.ones(2), nnx.static(5)])
  assert xs[1] == "tag" and xs[3] == 5  # the list holds the unwrapped values
  leaves = jax.tree.leaves(xs)
  assert leaves[0] == 1 and len(leaves) == 2
  np.testing.assert_array_equal(leaves[1], jnp.ones(2))


def test_flatten_unflatten_puts_static_items_back_in_place():
  xs = nnx.List([nnx.data(10), nnx.static("hello"), nnx.data(20)])
  leaves, treedef = jax.tree.flatten(xs)
  assert leaves == [10, 20]
  back = jax.tree.unflatten(treedef, [x * 2 for x in leaves])
  assert list(back) == [20, "hello", 40] and type(back) is nnx.List
  assert jax.tree.leaves(back) == [20, 40]  # still marked


def test_jit_sees_static_items_as_constants():
  xs = nnx.List([nnx.data(jnp.array(1.0)), nnx.static(999)])
  out = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t))(xs)
  assert out[1] == 999
  np.testing.assert_array_equal(out[0], 2.0)


def test_treedefs_differ_by_static_value():
  a = jax.tree.structure(nnx.List([nnx.static(1), jnp.ones(1)]))
  b = jax.tree.structure(nnx.List([nnx.static(2), jnp.ones(1)]))
  assert a != b
  assert a == jax.tree.structure(nnx.List([nnx.static(1), jnp.zeros(1)]))


def test_mutations_keep_markers_with_their_items():
  xs = nnx.List([nnx.static("s"), 1])
  xs.insert(0, nnx.data(0))
  xs.append(nnx.static("t"))
  xs.extend([nnx.data(7)])
  assert list(xs) == [0, "s", 1, "t", 7]
  assert jax.tree.leaves(xs) == [0, 1, 7]
  del xs[1]
  xs.pop()
  assert list(xs) == [0, 1, "t"] and jax.tree.leaves(xs) == [0, 1]
  xs.reverse()
  assert jax.tree.leaves(xs) == [1, 0]
  xs[0] = nnx.static("u")
  assert list(xs) == ["u", 1, 0] and jax.tree.leaves(xs) == [1, 0]
  xs.sort(key=str)
  assert list(xs) == [0, 1, "u"] and jax.tree.leaves(xs) == [0, 1]
  xs.clear()
  xs.append(3)
  assert jax.tree.leaves(xs) == [3]


def test_static_item_holding_data_raises():
  with pytest.raises(errors.GraphError, match="item 1 of an nnx.List"):
    nnx.List([1, nnx.static(jnp.ones(2))])
  xs = nnx.List([])
  with pytest.raises(errors.GraphError, match="Found data in value"):
    xs.append(nnx.static(nnx.Param(1.0)))


def test_graph_split_merge_keeps_markers():
  m = nnx.Module()
  m.xs = nnx.List([nnx.data(10), nnx.static("hello"), jnp.ones(2)])
  graphdef, state = nnx.split(m)
  assert sorted(p for p, _ in state.flat_state()) == [("xs", 0), ("xs", 2)]
  back = nnx.merge(graphdef, state)
  assert list(back.xs)[:2] == [10, "hello"]
  assert len(jax.tree.leaves(back)) == 2  # "hello" is still static
  assert nnx.graphdef(back) == graphdef


def test_shared_plain_dict_comes_back_as_two_dicts_sharing_variables():
  a = {"n": 1, "p": nnx.Param(2.0)}
  g = [a, 3, a, nnx.Param(4.0)]
  graphdef, state = nnx.split(g)
  out = nnx.merge(graphdef, state)
  assert out[0] is not out[2]  # plain dicts are pytrees: no identity
  assert out[0]["p"] is out[2]["p"]  # the Variable stays shared


def test_tracked_dict_and_cycles_keep_identity():
  d = nnx.Dict(p=nnx.Param(1.0))
  m = nnx.Module()
  m.x, m.y = d, d
  out = nnx.merge(*nnx.split(m))
  assert out.x is out.y
  cyc = [nnx.Param(1.0)]
  cyc.append(cyc)
  out = nnx.merge(*nnx.split(cyc))
  assert out[1] is out


def test_copy_deepcopy_and_pickle_keep_markers():
  xs = nnx.List([nnx.data(1), nnx.static("a"), [2]])
  for out in (copy.copy(xs), copy.deepcopy(xs), pickle.loads(pickle.dumps(xs))):
    assert type(out) is nnx.List and list(out) == [1, "a", [2]]
    assert jax.tree.leaves(out) == [1, 2]
  assert copy.deepcopy(xs)[2] is not xs[2]
  out = copy.copy(xs)
  out.append(nnx.static("b"))  # a copy is a working List
  assert jax.tree.leaves(out) == [1, 2] and len(xs) == 3
