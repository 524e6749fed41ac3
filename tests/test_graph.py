"""Tests for spmdnnx._graph: split/merge/update/state/pop/clone/iter_graph and GraphDef."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Count(nnx.Variable):
  pass


class LoRAParam(nnx.Param):
  pass


class Linear(nnx.Module):

  def __init__(self, din, dout, *, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout)),
                            logical_axes=("embed", "mlp"))
    self.bias = nnx.Param(jnp.zeros(dout))
    self.din, self.dout = din, dout

  def __call__(self, x):
    return x @ self.kernel + self.bias


class BatchNorm(nnx.Module):
  """Running-average normalisation with BatchStat state (BatchNorm-style)."""

  def __init__(self, n, momentum=0.5):
    self.mean = nnx.BatchStat(jnp.zeros(n))
    self.var = nnx.BatchStat(jnp.ones(n))
    self.scale = nnx.Param(jnp.ones(n))
    self.momentum = momentum
    self.use_running_average = False

  def __call__(self, x):
    if self.use_running_average:
      mean, var = self.mean.value, self.var.value
    else:
      mean, var = x.mean(0), x.var(0)
      m = self.momentum
      self.mean.value = m * self.mean.value + (1 - m) * mean
      self.var.value = m * self.var.value + (1 - m) * var
    return (x - mean) / jnp.sqrt(var + 1e-5) * self.scale


class MLP(nnx.Module):

  def __init__(self, *, rngs):
    self.l1 = Linear(2, 3, rngs=rngs)
    self.bn = BatchNorm(3)
    self.l2 = Linear(3, 1, rngs=rngs)
    self.count = Count(jnp.array(0))

  def __call__(self, x):
    self.count += 1
    return self.l2(jax.nn.relu(self.bn(self.l1(x))))


def mlp(seed=0):
  return MLP(rngs=nnx.Rngs(seed))


def paths(state):
  return [p for p, _ in state.flat_state()]


# --- split / merge -----------------------------------------------------------------


def test_split_returns_graphdef_and_live_state():
  m = mlp()
  graphdef, state = nnx.split(m)
  assert isinstance(graphdef, nnx.GraphDef)
  assert isinstance(state, nnx.State)
  assert paths(state) == [
      ("bn", "mean"), ("bn", "scale"), ("bn", "var"), ("count",), ("l1", "bias"),
      ("l1", "kernel"), ("l2", "bias"), ("l2", "kernel")]
  assert state.l1.kernel is m.l1.kernel  # the live Variable (Flax 0.12)
  assert state.l1.kernel.logical_axes == ("embed", "mlp")
  assert graphdef.root_type is MLP


def test_split_state_holds_the_live_variables():
  m = mlp()
  _, state = nnx.split(m)
  state.count.value = jnp.array(9)
  assert int(m.count.value) == 9
  # A pytree map makes new Variables: the model is untouched.
  doubled = jax.tree.map(lambda x: x * 2, state)
  assert doubled.count is not m.count and int(m.count.value) == 9


def test_merge_builds_fresh_equal_module():
  m = mlp()
  graphdef, state = nnx.split(m)
  m2 = nnx.merge(graphdef, state)
  assert type(m2) is MLP and m2 is not m
  # New objects around the same Variables (Flax 0.12: merge reuses them).
  assert m2.l1 is not m.l1 and m2.l1.kernel is m.l1.kernel
  assert m2.l1.din == 2 and m2.bn.momentum == 0.5
  x = jnp.ones((4, 2))
  np.testing.assert_allclose(m2(x), nnx.clone(m)(x))
  # copy=True gives independent Variables.
  m3 = nnx.merge(graphdef, state, copy=True)
  assert m3.l1.kernel is not m.l1.kernel
  m3.count.value = jnp.array(5)
  assert int(m2.count.value) == int(m.count.value) == 1


def test_split_with_filters():
  m = mlp()
  graphdef, params, stats, rest = nnx.split(m, nnx.Param, nnx.BatchStat, ...)
  assert paths(params) == [("bn", "scale"), ("l1", "bias"), ("l1", "kernel"),
                           ("l2", "bias"), ("l2", "kernel")]
  assert paths(stats) == [("bn", "mean"), ("bn", "var")]
  assert paths(rest) == [("count",)]
  m2 = nnx.merge(graphdef, params, stats, rest)
  assert type(m2.count) is Count
  np.testing.assert_array_equal(m2.bn.var.value, np.ones(3))


def test_split_by_param_and_user_type_and_merge_back():
  m = mlp()
  graphdef, params, counts, stats = nnx.split(m, nnx.Param, Count, nnx.BatchStat)
  assert paths(counts) == [("count",)]
  assert type(counts["count"]) is Count
  m2 = nnx.merge(graphdef, params, counts, stats)
  assert type(m2.count) is Count and int(m2.count.value) == 0
  m2(jnp.ones((2, 2)))
  assert int(m2.count.value) == 1


def test_split_not_exhaustive_error():
  with pytest.raises(errors.FilterError,
                     match=r"not exhaustive: 3 state leaves match none of them: bn/mean "
                     r"\(BatchStat\), bn/var \(BatchStat\), count \(Count\)\. Add '\.\.\.' "
                     r"as the last filter"):
    nnx.split(mlp(), nnx.Param)


def test_merge_accepts_states_in_any_order():
  graphdef, params, rest = nnx.split(mlp(), nnx.Param, ...)
  m = nnx.merge(graphdef, rest, params)
  assert type(m.bn.mean) is nnx.BatchStat


def test_merge_accepts_plain_nested_dicts():
  graphdef, state = nnx.split(mlp())
  raw = state.to_pure_dict()
  m = nnx.merge(graphdef, raw)
  assert type(m.l1.kernel) is nnx.Param
  assert m.l1.kernel.logical_axes == ("embed", "mlp")  # metadata from the GraphDef


def test_merge_missing_paths_error():
  graphdef, params, rest = nnx.split(mlp(), nnx.Param, ...)
  with pytest.raises(errors.GraphError,
                     match=r"merge: the State does not match the GraphDef: missing 3 path\(s\) "
                     r"the GraphDef needs: bn/mean, bn/var, count\. Pass the State\(s\) "
                     r"produced by split\(\) of the same graph"):
    nnx.merge(graphdef, params)


def test_merge_extra_paths_error():
  graphdef, state = nnx.split(mlp())
  state["extra"] = nnx.Param(jnp.ones(1))
  state["l1"]["other"] = nnx.Param(jnp.ones(1))
  with pytest.raises(errors.GraphError,
                     match=r"2 path\(s\) the GraphDef does not have: extra, l1/other\."):
    nnx.merge(graphdef, state)


def test_merge_missing_and_extra_reported_together():
  graphdef, state = nnx.split(mlp())
  del state["count"]
  state["cnt"] = Count(jnp.array(0))
  with pytest.raises(errors.GraphError,
                     match=r"missing 1 path\(s\) the GraphDef needs: count; 1 path\(s\) the "
                     r"GraphDef does not have: cnt\."):
    nnx.merge(graphdef, state)


def test_merge_state_of_other_structure_error():
  graphdef, _ = nnx.split(mlp())
  _, other = nnx.split(Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(errors.GraphError, match=r"missing 8 path\(s\).*2 path\(s\) the GraphDef "
                     r"does not have: bias, kernel"):
    nnx.merge(graphdef, other)


def test_merge_bad_arguments():
  _, state = nnx.split(mlp())
  with pytest.raises(errors.GraphError,
                     match=r"merge expects a GraphDef as first argument, got State; call it "
                     r"as merge\(graphdef, state, \.\.\.\)"):
    nnx.merge(state, state)
  graphdef = nnx.graphdef(mlp())
  with pytest.raises(errors.GraphError, match=r"merge expects States after the GraphDef, got int"):
    nnx.merge(graphdef, 3)


def test_graphdef_without_state():
  graphdef = nnx.graphdef(mlp())
  assert graphdef == nnx.split(mlp())[0]


# --- GraphDef ----------------------------------------------------------------------


def test_graphdef_hashable_and_equal_for_identical_structure():
  g1 = nnx.graphdef(mlp(0))
  g2 = nnx.graphdef(mlp(1))
  assert g1 == g2 and hash(g1) == hash(g2)
  assert len({g1, g2}) == 1


def test_graphdef_differs_on_static_attribute_metadata_or_type():
  base = nnx.graphdef(mlp())
  m = mlp()
  m.bn.momentum = 0.9
  assert nnx.graphdef(m) != base
  m = mlp()
  m.l1.kernel.set_metadata(logical_axes=("mlp", "embed"))
  assert nnx.graphdef(m) != base
  m = mlp()
  m.count = Count(jnp.array(0))  # same type: same structure
  assert nnx.graphdef(m) == base
  m.bn.mean = nnx.Cache(jnp.zeros(3))  # different Variable type
  assert nnx.graphdef(m) != base


def test_graphdef_as_jax_jit_argument():
  traces = []

  @jax.jit
  def f(graphdef, state, x):
    traces.append(1)
    return nnx.merge(graphdef, state)(x)

  g, s = nnx.split(mlp(0))
  x = jnp.ones((2, 2))
  f(g, s, x)
  g1, s1 = nnx.split(mlp(1))
  f(g1, s1, x)
  assert len(traces) == 1  # equal GraphDefs hit the same cache entry
  m = mlp()
  m.bn.momentum = 0.1
  f(*nnx.split(m), x)
  assert len(traces) == 2


def test_graphdef_as_static_argnum():
  g, s = nnx.split(mlp())
  out = jax.jit(lambda g, s: nnx.merge(g, s).count.value + 1, static_argnums=0)(g, s)
  assert int(out) == 1


def test_graphdef_repr():
  g = nnx.graphdef(Linear(2, 3, rngs=nnx.Rngs(0)))
  text = repr(g)
  assert text.startswith("GraphDef(\n  Linear(")
  assert "Param(logical_axes=('embed', 'mlp'))" in text
  assert "'din':" in text


def test_graphdef_apply():
  m = mlp()
  g, s = nnx.split(m)
  x = jnp.ones((4, 2))
  y, (g2, s2) = g.apply(s)(x)
  np.testing.assert_allclose(y, nnx.clone(m)(x))
  assert g2 == g
  assert int(s2["count"].value) == 1
  y1, _ = g.apply(s).l1(x)
  np.testing.assert_allclose(y1, m.l1(x))


# --- shared references and cycles -------------------------------------------------


class Shared(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.arange(3.0))
    self.alias = self.w
    self.lin = Linear(2, 2, rngs=nnx.Rngs(0))
    self.lin_alias = self.lin
    self.items = [self.lin, self.w]


def test_shared_variables_appear_once_and_come_back_shared():
  m = Shared()
  graphdef, state = nnx.split(m)
  # Attributes are walked in name order (as Flax): "alias" comes before "w".
  assert paths(state) == [("alias",), ("items", 0, "bias"), ("items", 0, "kernel")]
  m2 = nnx.merge(graphdef, state)
  assert m2.alias is m2.w
  assert m2.items[1] is m2.w
  assert m2.lin_alias is m2.lin
  assert m2.items[0] is m2.lin
  m2.w.value = jnp.zeros(3)
  np.testing.assert_array_equal(m2.alias.value, np.zeros(3))


def test_sharing_between_separately_passed_roots():
  shared = Linear(2, 2, rngs=nnx.Rngs(0))
  a, b = nnx.Module(), nnx.Module()
  a.lin, b.lin = shared, shared
  graphdef, state = nnx.split((a, b))
  assert paths(state) == [(0, "lin", "bias"), (0, "lin", "kernel")]
  a2, b2 = nnx.merge(graphdef, state)
  assert a2.lin is b2.lin


def test_reference_cycles():
  m = mlp()
  m.parent_ref = m
  m.l1.owner = m
  graphdef, state = nnx.split(m)
  assert len(state.flat_state()) == 8
  m2 = nnx.merge(graphdef, state)
  assert m2.parent_ref is m2 and m2.l1.owner is m2
  assert nnx.graphdef(m2) == graphdef
  m3 = nnx.clone(m)
  assert m3.parent_ref is m3 and m3 is not m


def test_mutual_cycle_between_modules():
  a, b = nnx.Module(), nnx.Module()
  a.other, b.other = b, a
  a.w = nnx.Param(jnp.ones(1))
  b.w = nnx.Param(jnp.zeros(1))
  graphdef, state = nnx.split(a)
  assert paths(state) == [("other", "w"), ("w",)]
  a2 = nnx.merge(graphdef, state)
  assert a2.other.other is a2
  assert float(a2.other.w.value[0]) == 0.0


# --- containers, raw arrays, statics -------------------------------------------------


class Containers(nnx.Module):

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.layers = [Linear(2, 2, rngs=rngs), Linear(2, 2, rngs=rngs)]
    self.by_name = {"enc": Linear(2, 2, rngs=rngs), "dec": Linear(2, 2, rngs=rngs)}
    self.pair = (Linear(2, 2, rngs=rngs), nnx.Param(jnp.ones(1)))
    self.raw = jnp.arange(2.0)
    self.np_raw = np.ones(2, np.float32)
    self.name = "model"
    self.sizes = [1, 2, 3]
    self.config = {"depth": 2, "act": "relu"}
    self.none = None
    self.fn = jax.nn.relu


def test_containers_of_modules_round_trip():
  m = Containers()
  graphdef, state = nnx.split(m)
  assert ("layers", 1, "kernel") in paths(state)
  assert ("by_name", "enc", "bias") in paths(state)
  assert ("pair", 0, "kernel") in paths(state)
  assert ("pair", 1) in paths(state)
  m2 = nnx.merge(graphdef, state)
  assert isinstance(m2.layers, list) and len(m2.layers) == 2
  assert isinstance(m2.by_name, dict) and set(m2.by_name) == {"enc", "dec"}
  assert type(m2.pair) is tuple and type(m2.pair[1]) is nnx.Param
  np.testing.assert_array_equal(m2.layers[1].kernel.value, m.layers[1].kernel.value)


def test_plain_lists_and_dicts_are_tracked_containers():
  m = Containers()
  assert type(m.layers) is nnx.List and isinstance(m.layers, list)
  assert type(m.by_name) is nnx.Dict and isinstance(m.by_name, dict)
  assert m.by_name.enc is m.by_name["enc"]


def test_raw_arrays_as_attributes():
  m = Containers()
  graphdef, state = nnx.split(m)
  assert isinstance(state["raw"], jax.Array)  # not wrapped in a Variable
  assert isinstance(state["np_raw"], np.ndarray)
  state["raw"] = state["raw"] + 10
  m2 = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(m2.raw, [10.0, 11.0])
  nnx.update(m, state)
  np.testing.assert_array_equal(m.raw, [10.0, 11.0])


def test_static_attributes_live_in_graphdef():
  m = Containers()
  graphdef, state = nnx.split(m)
  flat = paths(state)
  assert not any(p[0] in ("name", "sizes", "config", "none", "fn") for p in flat)
  m2 = nnx.merge(graphdef, state)
  assert m2.name == "model" and m2.sizes == [1, 2, 3]
  assert m2.config == {"depth": 2, "act": "relu"} and m2.none is None
  assert m2.fn is jax.nn.relu
  assert m2.layers[0].din == 2
  other = Containers()
  other.name = "other"
  assert nnx.graphdef(other) != graphdef


# --- state / graphdef / update / pop / clone ---------------------------------------


def test_state_with_filters_not_exhaustive():
  m = mlp()
  full = nnx.state(m)
  assert len(full.flat_state()) == 8
  params = nnx.state(m, nnx.Param)
  assert len(params.flat_state()) == 5
  stats, counts = nnx.state(m, nnx.BatchStat, Count)
  assert paths(stats) == [("bn", "mean"), ("bn", "var")]
  assert paths(counts) == [("count",)]
  assert nnx.state(m, nnx.Cache) == nnx.State({})


def test_update_writes_values_in_place():
  m = mlp()
  kernel = m.l1.kernel
  state = nnx.state(m)
  new = jax.tree.map(lambda x: x * 0, state)
  nnx.update(m, new)
  assert m.l1.kernel is kernel  # same Variable object, new value
  np.testing.assert_array_equal(kernel.value, np.zeros((2, 3)))
  assert m.l1.kernel.logical_axes == ("embed", "mlp")


def test_update_with_partial_and_several_states():
  m = mlp()
  params, stats = nnx.state(m, nnx.Param, nnx.BatchStat)
  params = jax.tree.map(jnp.zeros_like, params)
  stats = jax.tree.map(lambda x: x + 1, stats)
  nnx.update(m, params, stats)
  np.testing.assert_array_equal(m.bn.scale.value, np.zeros(3))
  np.testing.assert_array_equal(m.bn.mean.value, np.ones(3))
  assert int(m.count.value) == 0


def test_update_with_pure_dict():
  m = mlp()
  nnx.update(m, {"count": jnp.array(7)})
  assert int(m.count.value) == 7 and type(m.count) is Count


def test_update_changes_metadata():
  m = mlp()
  state = nnx.state(m)
  state.l1.kernel = state.l1.kernel.replace(logical_axes=("a", "b"))
  nnx.update(m, state)
  assert m.l1.kernel.logical_axes == ("a", "b")


def test_update_adds_new_variable():
  m = mlp()
  nnx.update(m, nnx.State({"l1": {"scale": LoRAParam(jnp.ones(2))}, "extra": Count(jnp.array(1))}))
  assert type(m.l1.scale) is LoRAParam
  assert type(m.extra) is Count
  assert ("l1", "scale") in paths(nnx.state(m))


def test_update_missing_node_error():
  m = mlp()
  with pytest.raises(errors.GraphError,
                     match=r"update: path nope/w does not exist in the graph \(no nope\); "
                     r"update can add Variables to existing nodes but not create nodes"):
    nnx.update(m, nnx.State({"nope": {"w": nnx.Param(jnp.ones(1))}}))


def test_update_into_tuple_error():
  m = Containers()
  with pytest.raises(errors.GraphError,
                     match=r"update: cannot set pair/2 inside a tuple \(immutable\); rebuild "
                     r"it with merge instead"):
    nnx.update(m, nnx.State({"pair": {2: nnx.Param(jnp.ones(1))}}))


def test_update_list_and_dict_items():
  m = Containers()
  nnx.update(m, {"layers": {0: {"bias": jnp.full(2, 3.0)}},
                 "by_name": {"dec": {"bias": jnp.full(2, 4.0)}}})
  np.testing.assert_array_equal(m.layers[0].bias.value, [3.0, 3.0])
  np.testing.assert_array_equal(m.by_name["dec"].bias.value, [4.0, 4.0])


def test_update_shared_variable_updates_all_aliases():
  m = Shared()
  nnx.update(m, {"w": jnp.zeros(3)})
  assert m.alias is m.w
  np.testing.assert_array_equal(m.items[1].value, np.zeros(3))


def test_pop_removes_and_returns():
  m = mlp()
  m.l1.inter = nnx.Intermediate((jnp.ones(1),))
  m.taps = nnx.Intermediate((jnp.zeros(1),))
  popped = nnx.pop(m, nnx.Intermediate)
  assert paths(popped) == [("l1", "inter"), ("taps",)]
  assert not hasattr(m.l1, "inter") and not hasattr(m, "taps")
  assert nnx.state(m, nnx.Intermediate) == nnx.State({})


def test_pop_several_filters_and_containers():
  m = Containers()
  m.layers[1].c = Count(jnp.array(1))
  m.by_name["x"] = nnx.Intermediate(jnp.ones(1))
  counts, inters = nnx.pop(m, Count, nnx.Intermediate)
  assert paths(counts) == [("layers", 1, "c")]
  assert paths(inters) == [("by_name", "x")]
  assert "x" not in m.by_name and not hasattr(m.layers[1], "c")


def test_pop_needs_filter():
  with pytest.raises(errors.FilterError,
                     match=r"pop needs at least one filter, e\.g\. pop\(model, nnx\.Intermediate\)"):
    nnx.pop(mlp())


def test_clone_is_deep_and_keeps_sharing():
  m = Shared()
  c = nnx.clone(m)
  assert c is not m and c.w is not m.w
  assert c.alias is c.w and c.lin_alias is c.lin
  c.w.value = jnp.zeros(3)
  np.testing.assert_array_equal(m.w.value, [0.0, 1.0, 2.0])


# --- iter_graph ---------------------------------------------------------------------


def test_iter_graph_post_order_root_last():
  m = mlp()
  items = list(nnx.iter_graph(m))
  assert items[-1] == ((), m)
  got = [p for p, _ in items]
  # Attributes in name order (as Flax NNX), children before parents.
  assert got == [
      ("bn", "mean"), ("bn", "scale"), ("bn", "var"), ("bn",),
      ("count",),
      ("l1", "bias"), ("l1", "kernel"), ("l1",),
      ("l2", "bias"), ("l2", "kernel"), ("l2",), ()]
  nodes = dict(items)
  assert nodes[("l1",)] is m.l1 and nodes[("bn", "mean")] is m.bn.mean


def test_iter_graph_children_before_parents():
  items = list(nnx.iter_graph(Containers()))
  pos = {p: i for i, (p, _) in enumerate(items)}
  for p in pos:
    if p:
      assert pos[p] < pos[p[:-1]], p


def test_iter_graph_shared_nodes_once():
  m = Shared()
  items = list(nnx.iter_graph(m))
  ids = [id(n) for _, n in items]
  assert ids.count(id(m.w)) == 1 and ids.count(id(m.lin)) == 1
  got = [p for p, _ in items]
  # Each shared node at its first path in name order.
  assert ("w",) not in got and ("lin",) not in got and ("lin_alias",) not in got
  assert ("alias",) in got and ("items", 0) in got
  assert ("items",) in got  # the list itself is a node


def test_iter_graph_cycles_terminate():
  m = mlp()
  m.me = m
  items = list(nnx.iter_graph(m))
  assert [p for p, n in items if n is m] == [()]


def test_iter_graph_skips_static_attributes_includes_raw_arrays():
  m = Containers()
  got = {p for p, _ in nnx.iter_graph(m)}
  assert ("raw",) in got
  assert ("name",) not in got and ("sizes",) not in got and ("config",) not in got


def test_is_graph_node_and_iter_children():
  m = mlp()
  assert nnx.is_graph_node(m) and nnx.is_graph_node(m.count)
  assert not nnx.is_graph_node(jnp.ones(1))
  assert [n for n, _ in nnx.iter_children(m)] == ["bn", "l1", "l2"]  # name order


# --- the functional API round trip --------------------------------------------------


def test_functional_api_round_trip_with_jax_jit():
  m = mlp()
  graphdef, state = nnx.split(m)

  @jax.jit
  def forward(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    y = model(x)
    _, new_state = nnx.split(model)
    return y, new_state

  x = jnp.arange(8.0).reshape(4, 2)
  expected = nnx.clone(m)(x)
  y, state = forward(graphdef, state, x)
  np.testing.assert_allclose(y, expected, rtol=1e-6)
  y, state = forward(graphdef, state, x)
  assert int(state["count"].value) == 2
  assert type(state["count"]) is Count
  nnx.update(m, state)
  assert int(m.count.value) == 2
  # BatchNorm running statistics moved towards the batch statistics.
  h = nnx.clone(m).l1(x)
  expected_mean = 0.75 * h.mean(0)  # momentum .5 twice from 0
  np.testing.assert_allclose(m.bn.mean.value, expected_mean, rtol=1e-5)
  assert m.bn.mean.logical_axes is None and m.l1.kernel.logical_axes == ("embed", "mlp")


def test_functional_api_train_step_param_and_count_split():
  m = mlp()
  graphdef, params, counts, rest = nnx.split(m, nnx.Param, Count, ...)

  @jax.jit
  def train_step(graphdef, params, counts, rest, x, y):

    def loss_fn(params):
      model = nnx.merge(graphdef, params, counts, rest)
      loss = ((model(x) - y) ** 2).mean()
      return loss, nnx.split(model, nnx.Param, Count, ...)[2:]

    (loss, (counts, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return loss, params, counts, rest

  x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))
  losses = []
  for _ in range(3):
    loss, params, counts, rest = train_step(graphdef, params, counts, rest, x, y)
    losses.append(float(loss))
  assert losses[2] < losses[0]
  nnx.update(m, params, counts, rest)
  assert int(m.count.value) == 3
  assert type(params.l1.kernel) is nnx.Param
  assert params.l1.kernel.logical_axes == ("embed", "mlp")


def test_counter_module_functional():

  class Counter(nnx.Module):

    def __init__(self):
      self.count = Count(jnp.array(0))

    def __call__(self):
      self.count += 1

  c = Counter()
  graphdef, state = nnx.split(c)

  @jax.jit
  def step(state):
    model = nnx.merge(graphdef, state)
    model()
    return nnx.state(model)

  for _ in range(3):
    state = step(state)
  nnx.update(c, state)
  assert int(c.count.value) == 3


# --- model surgery ------------------------------------------------------------------


class LoRA(nnx.Module):
  """Wraps a Linear, adding a low-rank trainable update."""

  def __init__(self, base, rank, *, rngs):
    self.base = base
    self.a = LoRAParam(jax.random.normal(rngs.params(), (base.din, rank)) * 0.1)
    self.b = LoRAParam(jnp.zeros((rank, base.dout)))

  def __call__(self, x):
    return self.base(x) + x @ self.a @ self.b


class Deep(nnx.Module):

  def __init__(self, *, rngs):
    self.layers = [Linear(2, 2, rngs=rngs) for _ in range(3)]
    self.head = Linear(2, 1, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.head(x)


def _apply_lora(model, rngs):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Linear) and path:
      parent = model
      for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
      wrapped = LoRA(node, 1, rngs=rngs)
      if isinstance(path[-1], int):
        parent[path[-1]] = wrapped
      else:
        setattr(parent, path[-1], wrapped)


def test_model_surgery_with_iter_graph():
  model = Deep(rngs=nnx.Rngs(0))
  x = jnp.ones((3, 2))
  before = model(x)
  originals = list(model.layers) + [model.head]
  _apply_lora(model, nnx.Rngs(1))
  assert all(type(layer) is LoRA for layer in model.layers)
  assert type(model.head) is LoRA
  assert [layer.base for layer in model.layers] + [model.head.base] == originals
  np.testing.assert_allclose(model(x), before, rtol=1e-6)  # b is zero: same output
  lora = nnx.state(model, LoRAParam)
  assert paths(lora) == [
      ("head", "a"), ("head", "b"), ("layers", 0, "a"), ("layers", 0, "b"),
      ("layers", 1, "a"), ("layers", 1, "b"), ("layers", 2, "a"), ("layers", 2, "b")]
  assert all(type(v) is LoRAParam for _, v in lora.flat_state())
  # LoRAParam is a Param: the Param filter sees both; Not() separates them.
  assert len(nnx.state(model, nnx.Param).flat_state()) == 16
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
  assert len(base.flat_state()) == 8
  graphdef, lora_s, rest = nnx.split(model, LoRAParam, ...)
  again = nnx.merge(graphdef, lora_s, rest)
  assert type(again.layers[0]) is LoRA and type(again.layers[0].a) is LoRAParam


@pytest.mark.parametrize("how", ["wrt", "diffstate"])
def test_model_surgery_train_only_lora(how):
  model = Deep(rngs=nnx.Rngs(0))
  _apply_lora(model, nnx.Rngs(1))
  frozen = jax.tree.map(lambda x: x, nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
  x = jnp.linspace(-1, 1, 6).reshape(3, 2)
  y = jnp.ones((3, 1))

  def loss_fn(m):
    return ((m(x) - y) ** 2).mean()

  if how == "wrt":
    grad_fn = nnx.grad(loss_fn, wrt=LoRAParam)
  else:
    grad_fn = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))
  first = float(loss_fn(model))
  for _ in range(5):
    grads = grad_fn(model)
    assert [p for p, _ in grads.flat_state()] == [p for p, _ in nnx.state(model, LoRAParam).flat_state()]
    lora = nnx.state(model, LoRAParam)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.2 * g, lora, grads))
  assert float(loss_fn(model)) < first
  after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
  for (p, a), (_, b) in zip(frozen.flat_state(), after.flat_state()):
    np.testing.assert_array_equal(a.value, b.value, err_msg=str(p))
  assert float(jnp.abs(model.layers[0].b.value).sum()) > 0


def test_split_merge_single_variable():
  v = Count(jnp.array(3), logical_axes=())
  graphdef, state = nnx.split(v)
  assert type(state) is Count and state is v
  v2 = nnx.merge(graphdef, state, copy=True)
  assert type(v2) is Count and v2 is not v and int(v2.value) == 3
  assert v2.logical_axes == ()
  graphdef, params, rest = nnx.split(v, nnx.Param, ...)
  assert params == nnx.State({}) and type(rest) is Count
  assert int(nnx.merge(graphdef, params, rest).value) == 3
  assert type(nnx.clone(v)) is Count


def test_nested_pytree_attribute_round_trips_with_full_key_paths():
  import optax

  class Holder(nnx.Object):
    def __init__(self):
      self.s = (optax.ScaleByAdamState(
          count=jnp.array(0),
          mu=nnx.State({"a": nnx.Param(jnp.ones(2)), "b": nnx.Param(jnp.zeros(2))}),
          nu={"a": jnp.ones(2), "b": jnp.ones(3)}), optax.EmptyState())

  graphdef, state = nnx.split(Holder())
  assert [p for p, _ in state.flat_state()] == [
      ("s", 0, "count"), ("s", 0, "mu", "a"), ("s", 0, "mu", "b"),
      ("s", 0, "nu", "a"), ("s", 0, "nu", "b")]
  copy = nnx.merge(graphdef, state)
  assert isinstance(copy.s[0], optax.ScaleByAdamState)
  assert isinstance(copy.s[0].mu["a"], nnx.Param)
  assert copy.s[0].nu["b"].shape == (3,)
