"""to_tree / from_tree / NodeStates: graph nodes of a pytree as (GraphDef, States) and back."""

import doctest
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx._graph_context import clear_non_graph_nodes


class Pair(nnx.Module):

  def __init__(self, a, b):
    self.a = nnx.Param(a)
    self.b = nnx.BatchStat(b)


def test_to_tree_replaces_nodes_and_keeps_other_leaves():
  m = Pair(jnp.ones(2), jnp.zeros(3))
  pure = nnx.to_tree((m, 7, {"again": m}))
  assert isinstance(pure[0], nnx.NodeStates) and pure[1] == 7
  assert sorted(pure[0].state) == ["a", "b"]
  back = nnx.from_tree(pure)
  assert back[0] is back[2]["again"]  # shared again after the round trip
  assert back[0] is not m
  np.testing.assert_array_equal(back[0].a.value, jnp.ones(2))


def test_node_states_is_a_pytree_of_its_states():
  m = Pair(jnp.ones(2), jnp.zeros(3))
  ns = nnx.NodeStates.from_split(*nnx.split(m, nnx.Param, nnx.BatchStat), metadata="x")
  leaves, treedef = jax.tree.flatten(ns)
  assert [x.shape for x in leaves] == [(2,), (3,)]
  doubled = jax.tree.unflatten(treedef, [x + 1 for x in leaves])
  assert doubled.metadata == "x" and doubled.graphdef == ns.graphdef
  np.testing.assert_array_equal(doubled.states[0]["a"].value, 2 * jnp.ones(2))


def test_node_states_without_graphdef_or_with_many_states_raises():
  ns = nnx.NodeStates.from_prefixes((0, None))
  with pytest.raises(errors.GraphError, match="No graphdef available"):
    ns.graphdef
  with pytest.raises(errors.GraphError, match="exactly one State, got 2"):
    ns.state


def test_from_tree_rejects_a_leaf_that_is_not_node_states():
  with pytest.raises(errors.GraphError, match="expected a NodeStates"):
    nnx.from_tree([1], is_node_leaf=lambda x: True)


def test_to_tree_same_prefix_for_a_shared_node_is_accepted():
  m = Pair(jnp.ones(2), jnp.zeros(3))
  pure = nnx.to_tree((m, 1, {"b": m}), prefix=(0, None, 0))
  assert isinstance(pure[2]["b"], nnx.NodeStates)


def test_to_tree_different_prefixes_for_a_shared_node_lists_every_path():
  m = Pair(jnp.ones(2), jnp.zeros(3))
  with pytest.raises(errors.GraphError, match="Inconsistent aliasing detected") as info:
    nnx.to_tree((m, 1, {"b": m}), prefix=(0, None, 1))
  assert ("0", "a") in {tuple(map(str, p)) for p in info.value.paths}
  assert ("2", "b", "b") in {tuple(map(str, p)) for p in info.value.paths}
  # check_aliasing=False skips the check.
  nnx.to_tree((m, 1, {"b": m}), prefix=(0, None, 1), check_aliasing=False)


def test_to_tree_gives_each_split_fn_call_its_prefix():
  m1, m2 = Pair(jnp.ones(2), jnp.zeros(3)), Pair(jnp.ones(2), jnp.zeros(3))
  seen = []

  def split_fn(ctx, path, prefix, x):
    seen.append((jax.tree_util.keystr(path), prefix))
    return nnx.NodeStates.from_split(*ctx.split(x))

  nnx.to_tree({"x": m1, "y": [m2, 3]}, prefix={"x": 0, "y": 1}, split_fn=split_fn)
  assert seen == [("['x']", 0), ("['y'][0]", 1)]


def test_to_tree_from_tree_through_jax_vmap_updates_the_originals():
  tag = "to_tree_vmap"
  with nnx.update_context(tag):
    m1 = Pair(jnp.array(0.0), jnp.arange(4.0))
    m2 = Pair(jnp.array(1.0), jnp.array(2.0))
    axes = nnx.NodeStates.from_prefixes((None, 0))  # Param broadcast, BatchStat mapped

    def split_fn(ctx, path, prefix, x):
      if prefix == "per_filter":
        return nnx.NodeStates.from_split(*ctx.split(x, nnx.Param, nnx.BatchStat))
      return nnx.NodeStates.from_split(*ctx.split(x))

    prefix = ("per_filter", None, {"b": "per_filter"})
    pure = nnx.to_tree((m1, m2, {"b": m1}), ctxtag=tag, prefix=prefix, split_fn=split_fn)
    in_axes = (axes, None, {"b": axes})

    @functools.partial(jax.vmap, in_axes=in_axes, out_axes=(in_axes, 0))
    def f(*pure_args):
      a1, a2, d = nnx.from_tree(pure_args, ctxtag=tag, is_inner=True)
      assert a1 is d["b"]
      a1.b.value = a1.b.value + 10.0  # an update the outer objects must see
      y = a1.a.value + a1.b.value + a2.a.value + a2.b.value
      out = nnx.to_tree(clear_non_graph_nodes((a1, a2, d)), prefix=prefix, ctxtag=tag,
                        split_fn=split_fn)
      return out, y

    pure_out, y = f(*pure)
    out = nnx.from_tree(pure_out, ctxtag=tag, is_inner=False)
  assert out[0] is m1 and out[2]["b"] is m1 and out[1] is m2
  np.testing.assert_array_equal(m1.b.value, jnp.arange(4.0) + 10.0)
  np.testing.assert_array_equal(y, jnp.arange(4.0) + 13.0)


def test_clear_non_graph_nodes_keeps_only_nodes():
  m = Pair(jnp.ones(2), jnp.zeros(3))
  out = clear_non_graph_nodes({"m": m, "n": 3, "arr": jnp.ones(1), "v": m.a})
  assert out == {"m": m, "n": None, "arr": None, "v": m.a}


@pytest.mark.parametrize("name", ["spmdnnx._graph_context", "spmdnnx._object", "spmdnnx._graph_api"])
def test_docstring_examples(name):
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
