"""Per-object prefixes (`nnx.prefix`) in vmap (and jit), bare Variable arguments, prefix errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Ens(nnx.Module):
  """w is stacked (4 members), s is one shared scale, n counts calls per member."""

  def __init__(self):
    self.w = nnx.Param(jnp.arange(24.0).reshape(4, 2, 3))
    self.s = nnx.Param(jnp.array(2.0))
    self.n = nnx.BatchStat(jnp.zeros((4,)))

  def __call__(self, x):
    self.n[...] += 1.0
    return (x @ self.w[...]) * self.s[...]


def expected(m, x):
  return np.stack([(x @ np.asarray(m.w[...][i])) * 2.0 for i in range(4)])


MAP_W_N = {nnx.PathContains("w"): 0, nnx.BatchStat: 0, ...: None}


# --- nnx.prefix ---------------------------------------------------------------------


def test_prefix_graph_mode_gives_a_tree_state_per_object_split_jointly():
  m = Ens()
  p = nnx.prefix(m, MAP_W_N, graph=True)
  assert isinstance(p, nnx.extract.TreeState)
  assert (p.state["w"], p.state["s"], p.state["n"]) == (0, None, 0)
  first, second = nnx.prefix((m, m), MAP_W_N, graph=True)
  assert dict(first.state) == {"n": 0, "s": None, "w": 0}
  assert dict(second.state) == {}  # already given by the first occurrence
  assert nnx.prefix(nnx.Param(jnp.ones(2)), {nnx.Param: 0}, graph=True) == 0


def test_prefix_tree_mode_gives_a_state_per_object():
  m = Ens()
  p = nnx.prefix((m, jnp.ones(2)), MAP_W_N, graph=False)
  assert type(p[0]) is nnx.State and (p[0].w, p[0].s, p[0].n) == (0, None, 0)
  assert p[1] is None  # a plain leaf gets filter_map(path, leaf): the catch-all here
  assert isinstance(m.w, nnx.Param)  # the object itself is untouched


def test_vmap_in_axes_module_shaped_prefix_in_tree_mode():
  m = Ens()
  axes = jax.tree.map(lambda v: 0 if v.shape else None, m,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert type(axes) is Ens and (axes.w, axes.s) == (0, None)
  y = nnx.vmap(lambda m, x: m(x), in_axes=(axes, None), graph=False)(m, jnp.ones(2))
  np.testing.assert_allclose(y, expected(m, jnp.ones(2)))


def test_prefix_no_match_lists_the_path_and_filters():
  with pytest.raises(errors.TransformError,
                     match=r"No filter matched leaf at path n \(BatchStat\).*catch-all"):
    nnx.prefix(Ens(), {nnx.Param: 0}, graph=False)
  with pytest.raises(ValueError, match="No filter matched"):
    nnx.prefix(Ens(), {nnx.Param: 0}, graph=True)


# --- vmap reading prefixes ------------------------------------------------------------


@pytest.mark.parametrize("graph,updates", [(True, True), (True, False), (False, False)])
def test_vmap_in_axes_prefix_maps_per_variable_and_writes_back(graph, updates):
  m = Ens()
  axes = nnx.prefix(m, MAP_W_N, graph=graph)
  f = nnx.vmap(lambda m, x: m(x), in_axes=(axes, None), graph=graph,
               graph_updates=updates)
  x = jnp.array([1.0, -1.0])
  np.testing.assert_allclose(f(m, x), expected(m, x))
  # n was mapped: each member counted its own call; s (broadcast) is untouched.
  np.testing.assert_array_equal(m.n[...], np.ones(4))
  assert m.s.shape == ()


def test_vmap_in_axes_plain_state_prefix_of_the_objects_paths():
  m = Ens()
  axes = nnx.State({"w": 0, "s": None, "n": 0})
  y = nnx.vmap(lambda m, x: m(x), in_axes=(axes, None), graph_updates=False)(m, jnp.ones(2))
  np.testing.assert_allclose(y, expected(m, jnp.ones(2)))


def test_vmap_prefix_not_covering_a_variable_is_an_error_not_a_broadcast():
  m = Ens()
  axes = nnx.State({"w": 0, "s": None})  # no entry for n
  f = nnx.vmap(lambda m, x: m(x), in_axes=(axes, None), graph_updates=False)
  with pytest.raises(errors.TransformError,
                     match=r"the axis prefixes do not cover 1 state leaves: n") as info:
    f(m, jnp.ones(2))
  assert info.value.paths == [("n",)]


@pytest.mark.parametrize("graph", [True, False])
def test_vmap_out_axes_prefix_places_new_objects_variables(graph):
  proto = nnx.eval_shape(Ens)
  axes = nnx.prefix(proto, {nnx.PathContains("w"): 0, ...: None}, graph=graph)

  @nnx.vmap(in_axes=0, out_axes=axes, graph=graph, graph_updates=False)
  def make(k):
    m = Ens()
    m.w[...] = m.w[...] + k
    return m

  m = make(jnp.arange(3.0))
  assert m.w.shape == (3, 4, 2, 3)
  np.testing.assert_allclose(m.w[...][2] - m.w[...][0], 2.0)
  assert m.s.shape == () and m.n.shape == (4,)  # unmapped: one copy


def test_vmap_out_axes_prefix_for_a_plain_output_is_an_error():
  axes = nnx.prefix(Ens(), {...: 0})
  f = nnx.vmap(lambda x: x, in_axes=0, out_axes=axes, graph_updates=False)
  with pytest.raises(errors.TransformError, match="per-Variable axes.*not a graph object"):
    f(jnp.ones(3))


def test_vmap_aliased_arguments_with_joint_prefixes_stay_shared():
  m = Ens()
  a, b = nnx.prefix((m, m), MAP_W_N, graph=True)

  @nnx.vmap(in_axes=(a, b, None), graph=True, graph_updates=False)
  def f(m1, m2, x):
    assert m1 is m2
    return m1(x) + m2(x)

  x = jnp.ones(2)
  np.testing.assert_allclose(f(m, m, x), 2 * expected(m, x))
  np.testing.assert_array_equal(m.n[...], 2 * np.ones(4))


class Holder(nnx.Module):
  def __init__(self, **variables):
    for name, v in variables.items():
      setattr(self, name, v)


def test_vmap_aliased_variable_with_different_prefixes_is_an_error():
  v = nnx.Param(jnp.ones((4, 4, 3)))
  foo = Holder(a=nnx.Param(jnp.ones((4, 2, 3))), b=v)
  bar = Holder(c=v)
  pa, pb = nnx.prefix((foo, bar), lambda p, x: 1 if p[-1] == "c" else 0, graph=True)
  assert dict(pb.state) == {}  # c is b: given by foo's prefix
  f = nnx.vmap(lambda foo, bar: foo.a[...].sum(), in_axes=(pa, pb), graph=True,
               graph_updates=False)
  with pytest.raises(errors.TransformError,
                     match=r"Inconsistent aliasing detected\. The following nodes have "
                     r"different prefixes[\s\S]*Param:\n  b: 0\n  c: 1"):
    f(foo, bar)


# --- bare Variables as arguments --------------------------------------------------------


@pytest.mark.parametrize("graph,updates", [(True, True), (True, False), (False, False)])
def test_bare_variables_through_remat_and_grad(graph, updates):
  w = nnx.Param(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
  count = nnx.BatchStat(jnp.array(0))

  @nnx.remat(graph=graph, graph_updates=updates)
  def f(w, count, x):
    count[...] += 1
    return x @ w

  loss, grad = nnx.value_and_grad(lambda w, c, x: jnp.sum(f(w, c, x)), graph=graph,
                                  graph_updates=updates)(w, count, jnp.array([1.0, 1.0]))
  assert float(loss) == 10.0 and int(count[...]) == 1
  grad_value = grad[...] if isinstance(grad, nnx.Variable) else grad
  np.testing.assert_allclose(grad_value, np.ones((2, 2)))


@pytest.mark.parametrize("graph", [True, False])
def test_vmap_bare_variable_with_its_prefix(graph):
  v = nnx.Param(jnp.arange(6.0).reshape(3, 2))
  axes = nnx.prefix(v, {nnx.Param: 0}, graph=graph)
  y = nnx.vmap(lambda v, x: v[...] @ x, in_axes=(axes, None), graph=graph,
               graph_updates=False)(v, jnp.ones(2))
  np.testing.assert_allclose(y, [1.0, 5.0, 9.0])


# --- errors ---------------------------------------------------------------------------


def test_vmap_and_scan_refuse_bound_methods():
  m = Ens()
  with pytest.raises(errors.TransformError, match="nnx.vmap does not support bound methods"):
    nnx.vmap(m.__call__, in_axes=(0,))
  with pytest.raises(errors.TransformError, match="nnx.scan does not support bound methods"):
    nnx.scan(m.__call__, in_axes=(0,))


def test_graph_node_container_as_prefix_in_graph_mode_is_an_error():
  d = nnx.Dict(a=nnx.Param(1))
  with pytest.raises(errors.TransformError,
                     match=r"in_axes is an nnx.Dict: Graph nodes are not allowed as prefixes"):
    nnx.vmap(lambda x: x, in_axes=d, graph=True, graph_updates=True)
  with pytest.raises(errors.TransformError, match="Graph nodes are not allowed as prefixes"):
    nnx.jit(lambda x: x, in_shardings=d)


def test_returning_an_input_without_updates_is_refused_before_the_broadcast_check():
  m = Ens()
  axes = nnx.prefix(m, MAP_W_N)

  @nnx.vmap(in_axes=(axes,), out_axes=axes, graph_updates=False)
  def f(m):
    m.s[...] += m.w[...].sum()  # a per-member value into broadcast state
    return m

  with pytest.raises(errors.TransformError, match=r"Duplicate BatchStat[\s\S]*0/n\n  - output/0/n"):
    f(m)


def test_batched_update_of_broadcast_state_names_the_path():
  m = Ens()

  @nnx.vmap(in_axes=(nnx.StateAxes({nnx.PathContains("s"): None, ...: 0}),))
  def f(m):
    m.s[...] += m.w[...].sum()

  with pytest.raises(errors.TransformError,
                     match=r"at vmap state \['s'\], got axis spec None but output was "
                     r"batched on axis 0") as info:
    f(m)
  assert info.value.paths == ["s"]


@pytest.mark.parametrize("updates", [True, False])
def test_vmap_returning_one_new_object_twice_gives_one_object(updates):
  @nnx.vmap(in_axes=0, out_axes=(0, 0, 0), graph_updates=updates)
  def make(k):
    m = Holder(w=nnx.Param(jnp.ones(2) * k))
    return m, m, Holder(w=nnx.Param(jnp.ones(2) * k))

  a, b, c = make(jnp.arange(3.0))
  assert c is not a and c.w is not a.w
  assert a is b and a.w.shape == (3, 2)
  np.testing.assert_allclose(a.w[...][:, 0], [0.0, 1.0, 2.0])


def test_jit_one_object_twice_with_equivalent_sharding_prefixes():
  mesh = jax.sharding.Mesh(jax.devices(), ("a",))
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a"))
  m = Holder(w=nnx.Param(jnp.ones((8, 2))), b=nnx.Param(jnp.ones(8)))
  f = nnx.jit(lambda x, y, z: None, in_shardings=(
      row, nnx.StateSharding({...: row}), nnx.StateSharding({nnx.Param: row})))
  f(m, m, m)
  assert m.w[...].sharding.is_equivalent_to(row, 2)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  g = nnx.jit(lambda x, y: None, in_shardings=(
      row, nnx.StateSharding({nnx.PathContains("w"): rep, ...: row})))
  with pytest.raises(errors.TransformError, match="Inconsistent aliasing: arguments 0 and 1"):
    g(m, m)


def test_vmap_tree_state_whose_filters_miss_a_variable_is_an_error():
  axes = nnx.prefix(Holder(w=nnx.Param(jnp.ones((4, 2)))), {nnx.Param: 0}, graph=True)
  m = Holder(w=nnx.Param(jnp.ones((4, 2))), n=nnx.BatchStat(jnp.zeros(4)))
  f = nnx.vmap(lambda m: m.w[...].sum(), in_axes=(axes,), graph_updates=False)
  with pytest.raises(errors.TransformError, match=r"prefixes do not cover 1 state leaves: n"):
    f(m)
