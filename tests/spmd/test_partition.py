"""Tests for get_partition_spec / get_named_sharding / leaf_shardings and the context."""

import threading

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx.spmd._context import current_context, use_sharding
from spmdnnx.spmd._mesh import MeshConfig, make_mesh, plan_abstract
from spmdnnx.spmd._partition import get_named_sharding, get_partition_spec
from spmdnnx.spmd._resolve import leaf_shardings, leaf_specs
from spmdnnx._state import State
from spmdnnx._variables import BatchStat, Param


class Block(Module):

  def __init__(self, rngs):
    init = jax.nn.initializers.normal(1.0)
    self.up = Param(init(rngs.params(), (16, 32)), logical_axes=("embed", "mlp"))
    self.bias = Param(jnp.zeros((32,)), logical_axes=("mlp",))
    self.down = Param(init(rngs.params(), (32, 16)), logical_axes=("mlp", "embed"))
    self.count = BatchStat(jnp.zeros((), jnp.int32))
    self.table = jnp.ones((4, 16))


EXPECTED = {("up",): P("fsdp", "tensor"), ("bias",): P("tensor"),
            ("down",): P("tensor", "fsdp"), ("count",): P(), ("table",): P()}


@pytest.fixture
def mesh():
  return make_mesh(MeshConfig(fsdp=4, tensor=2))


def test_context_stack_is_nested_and_thread_local(mesh):
  assert current_context() is None
  with use_sharding(mesh, "fsdp_tp") as outer:
    assert current_context() is outer and outer.rules.name == "fsdp_tp"
    with use_sharding(None, [("embed", None)]) as inner:
      assert current_context() is inner and inner.mesh is None
      seen = []
      t = threading.Thread(target=lambda: seen.append(current_context()))
      t.start()
      t.join()
      assert seen == [None]
    assert current_context() is outer
  assert current_context() is None


def test_use_sharding_validates_rules_against_mesh(mesh):
  with pytest.raises(errors.AxisRulesError, match=r"\('embed' -> model\) names 'model'"):
    with use_sharding(mesh, [("embed", "model")]):
      pass
  assert current_context() is None


def test_partition_spec_of_module_keeps_structure_and_metadata(mesh):
  model = Block(Rngs(0))
  specs = get_partition_spec(model, rules="fsdp_tp", mesh=mesh)
  assert isinstance(specs, State)
  flat = dict(specs.flat_state())
  assert {p: (v.value if isinstance(v, Param | BatchStat) else v)
          for p, v in flat.items()} == EXPECTED
  assert type(flat[("up",)]) is Param and flat[("up",)].logical_axes == ("embed", "mlp")
  assert jax.tree.structure(specs) == jax.tree.structure(graph.state(model))


def test_partition_spec_without_mesh_ignores_divisibility():
  s = State({"w": Param(jnp.zeros((3, 5)), logical_axes=("embed", "mlp"))})
  assert get_partition_spec(s, rules="fsdp_tp").w.value == P("fsdp", "tensor")


def test_named_sharding_from_context_places_real_arrays(mesh):
  model = Block(Rngs(0))
  with use_sharding(mesh, "fsdp_tp"):
    shardings = get_named_sharding(model)
  state = jax.device_put(graph.state(model), shardings)
  for path, leaf in state.flat_state():
    value = leaf.value if isinstance(leaf, Param | BatchStat) else leaf
    assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh
    assert value.sharding.spec == EXPECTED[path]
  assert state.up.value.addressable_shards[0].data.shape == (4, 16)
  assert state.down.value.addressable_shards[0].data.shape == (16, 4)
  assert state.table.addressable_shards[0].data.shape == (4, 16)
  rebuilt = graph.merge(graph.graphdef(model), state)
  assert rebuilt.up.value.sharding.spec == P("fsdp", "tensor")


def test_abstract_state_and_abstract_mesh():
  abstract = jax.eval_shape(lambda: graph.split(Block(Rngs(0)))[1])
  assert isinstance(abstract.up.value, jax.ShapeDtypeStruct)
  amesh = plan_abstract(MeshConfig(fsdp=-1, tensor=8), 512)
  with pytest.warns(errors.ShardingWarning, match=r"up dim 0 \('embed', size 16; tried fsdp=64"):
    shardings = get_named_sharding(abstract, amesh, "fsdp_tp")
  assert shardings.up.value.spec == P(None, "tensor")  # 16 not divisible by fsdp=64
  assert shardings.up.value.mesh == amesh


def test_plain_pytree_of_variables(mesh):
  tree = {"a": [Param(jnp.zeros((8,)), logical_axes=("embed",))], "b": jnp.zeros(3)}
  out = get_named_sharding(tree, mesh, "fsdp")
  assert out["a"][0].value == NamedSharding(mesh, P("fsdp"))
  assert out["b"] == NamedSharding(mesh, P())


def test_missing_mesh_raises():
  # No rules, no context: Flax's convention, which still needs a mesh.
  with pytest.raises(errors.ShardingError,
                     match=r"get_named_sharding needs a mesh: pass it \(get_named_sharding\(tree, "
                           r"mesh\)\), run inside `with jax.set_mesh\(mesh\):`"):
    get_named_sharding(State({}))


def test_rules_without_a_mesh_still_need_a_mesh_for_named_shardings():
  with pytest.raises(errors.ShardingError, match=r"get_named_sharding needs mesh"):
    get_named_sharding(State({}), rules="fsdp")


def test_unknown_names_reported_for_all_paths_at_once(mesh):
  s = State({"a": Param(jnp.zeros((8,)), logical_axes=("foo",)),
             "b": {"c": Param(jnp.zeros((8, 8)), logical_axes=("embed", "bar"))}})
  with pytest.raises(errors.AxisRulesError,
                     match=r"No axis rule for logical name\(s\) \['bar', 'foo'\]; used by: "
                           r"a \['foo'\], b/c \['bar'\]"):
    get_named_sharding(s, mesh, "fsdp_tp")


def test_indivisible_dims_warn_once_for_all_paths(mesh):
  s = State({"a": Param(jnp.zeros((6, 8)), logical_axes=("embed", "mlp")),
             "b": Param(jnp.zeros((5,)), logical_axes=("mlp",))})
  with pytest.warns(errors.ShardingWarning) as record:
    out = get_named_sharding(s, mesh, "fsdp_tp")
  assert len(record) == 1
  message = str(record[0].message)
  assert message.startswith("2 dimension(s) stay unsplit (replicated)")
  assert "a dim 0 ('embed', size 6; tried fsdp=4)" in message
  assert "b dim 0 ('mlp', size 5; tried tensor=2, fsdp=4)" in message
  assert out.a.value.spec == P(None, "tensor")


def test_rank_mismatch_lists_every_path(mesh):
  a = Param(jnp.zeros((2, 2)), logical_axes=("embed", "mlp"))
  b = Param(jnp.zeros((2,)), logical_axes=("embed",))
  a.value = jnp.zeros((4,))
  b.value = jnp.zeros((2, 2))
  with pytest.raises(errors.MetadataError,
                     match=r"logical_axes length differs from the array rank for: a \(axes "
                           r"\('embed', 'mlp'\), shape \(4,\)\), b \(axes \('embed',\), shape "
                           r"\(2, 2\)\)"):
    get_partition_spec(State({"a": a, "b": b}), "fsdp")


def test_error_lists_are_capped(mesh):
  s = State({f"p{i:02d}": Param(jnp.zeros((8,)), logical_axes=(f"n{i:02d}",))
             for i in range(15)})
  with pytest.raises(errors.AxisRulesError, match=r"p09 \['n09'\] \(and 5 more\)"):
    get_partition_spec(s, "fsdp")


def test_leaf_shardings_flat_helper(mesh):
  leaves = [Param(jnp.zeros((8, 8)), logical_axes=("embed", "mlp")),
            Param(jnp.zeros((3,))),
            jax.ShapeDtypeStruct((8,), jnp.float32)]
  paths = [("w",), ("u",), ("raw",)]
  out = leaf_shardings(paths, leaves, mesh, "fsdp_tp")
  assert out == [NamedSharding(mesh, P("fsdp", "tensor")), NamedSharding(mesh, P()),
                 NamedSharding(mesh, P())]
  with use_sharding(mesh, "fsdp"):
    assert leaf_shardings(paths, leaves)[0] == NamedSharding(mesh, P("fsdp", None))
  assert leaf_specs(paths, leaves, "dp", mesh) == [P(None, None), P(), P()]
  with pytest.raises(errors.ShardingError, match=r"leaf_shardings needs mesh and rules"):
    leaf_shardings(paths, leaves)
