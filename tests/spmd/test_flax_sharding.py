"""Sharding as Flax NNX users write it: out_sharding, eager sharding, abstract models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors


def _mesh(names=("data", "model"), kind=AxisType.Auto, shape=(2, 4)):
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


@pytest.fixture(scope="module")
def mesh():
  return _mesh()


# --- metadata -----------------------------------------------------------------------

def test_out_sharding_tuple_is_logical_axes_and_sharding_is_the_placement():
  v = nnx.Param(jnp.ones((4, 2)), out_sharding=("embed", None))
  assert v.logical_axes == v.out_sharding == ("embed", None)
  assert v.sharding == v.value.sharding  # Flax: the value's sharding


def test_partition_spec_out_sharding_names_mesh_axes(mesh):
  v = nnx.Param(jnp.ones((4, 8)), out_sharding=P("data", "model"), eager_sharding=False)
  assert v.logical_axes is None and v.out_sharding == P("data", "model")
  assert v.eager_sharding is False
  # The spec is kept as given, also on the rules path.
  with nnx.use_sharding(mesh, [("embed", "data")]):
    assert nnx.get_partition_spec(v).value == P("data", "model")


def test_logical_and_physical_sharding_together_is_an_error():
  with pytest.raises(errors.MetadataError, match=r"logical axes \('a', 'b'\) and the mesh "
                     r"sharding P\('a', 'b'\) were both given"):
    nnx.Param(jnp.ones((2, 2)), logical_axes=("a", "b"), out_sharding=P("a", "b"))


def test_with_partitioning_keeps_flax_keyword():
  init = nnx.with_partitioning(nnx.initializers.ones, sharding=("data", "model"))
  layer = nnx.Linear(2, 4, kernel_init=init, rngs=nnx.Rngs(0))
  assert layer.kernel.out_sharding == ("data", "model")


# --- eager sharding -----------------------------------------------------------------

@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_variable_is_sharded_at_creation_under_set_mesh(kind):
  mesh = _mesh(kind=kind)
  x = jnp.arange(32.0).reshape(4, 8)
  with jax.set_mesh(mesh):
    v = nnx.Param(x, out_sharding=("data", "model"))
  assert v.sharding == NamedSharding(mesh, P("data", "model"))
  assert v.value.addressable_shards[0].data.shape == (2, 2)
  np.testing.assert_array_equal(v.value, x)  # placed, not changed


def test_without_a_mesh_nothing_is_placed():
  v = nnx.Param(jnp.ones((4, 8)), out_sharding=("data", "model"))
  assert not isinstance(v.sharding, NamedSharding)


def test_mesh_metadata_places_without_set_mesh(mesh):
  v = nnx.Variable(jnp.ones((4, 8)), out_sharding=("data", "model"), mesh=mesh)
  assert v.sharding == NamedSharding(mesh, P("data", "model"))
  ns = NamedSharding(mesh, P(None, "model"))
  assert nnx.Variable(jnp.ones((4, 8)), out_sharding=ns).sharding == ns


def test_sharded_inside_jax_jit(mesh):
  @jax.jit
  def make():
    return nnx.split(nnx.Param(jnp.ones((8, 4)), out_sharding=("data", "model")))

  with jax.set_mesh(mesh):
    _, state = make()
  assert state.value.sharding.spec == P("data", "model")


def test_use_eager_sharding_block_and_per_variable_flag(mesh):
  with jax.set_mesh(mesh):
    with nnx.use_eager_sharding(False):
      assert not nnx.using_eager_sharding()
      off = nnx.Param(jnp.ones((4, 8)), out_sharding=("data", "model"))
    assert nnx.using_eager_sharding()
    own = nnx.Param(jnp.ones((4, 8)), out_sharding=("data", "model"), eager_sharding=False)
    with nnx.use_eager_sharding(False):
      forced = nnx.Param(jnp.ones((4, 8)), out_sharding=("data", "model"), eager_sharding=True)
  assert off.sharding.spec == P() and own.sharding.spec == P()
  assert forced.sharding.spec == P("data", "model")


def test_logical_axis_rules_and_sharding_rules(mesh):
  with jax.set_mesh(mesh), nnx.logical_axis_rules([("embed", "model")]):
    v = nnx.Param(jnp.ones((8, 4)), out_sharding=("batch_alias", "embed"),
                  sharding_rules=(("batch_alias", "data"),))
  assert v.sharding.spec == P("data", "model")
  # Outside the block only the Variable's own sharding_rules apply.
  assert nnx.get_partition_spec(v).value == P("data", "embed")


def test_conflicting_rules_raise(mesh):
  with jax.set_mesh(mesh), nnx.logical_axis_rules([("embed", "model")]):
    with pytest.raises(errors.AxisRulesError, match=r"map names differently: 'embed': "
                       r"'model' vs 'data'"):
      nnx.Param(jnp.ones((8,)), out_sharding=("embed",), sharding_rules=(("embed", "data"),))


def test_malformed_rules_raise():
  with pytest.raises(errors.AxisRulesError, match=r"logical_axis_rules must be pairs"):
    with nnx.logical_axis_rules([("embed", "model", "extra")]):
      pass


def test_unknown_name_raises_but_standard_names_stay_replicated(mesh):
  with jax.set_mesh(mesh):
    with pytest.raises(errors.ShardingError, match=r"the mesh \('data', 'model'\) has no axis "
                       r"'modle' and no rule maps that name"):
      nnx.Param(jnp.ones((4, 8)), out_sharding=(None, "modle"))
    # Built-in layers' default names (vocab, embed) are not mesh axes here.
    layer = nnx.Embed(16, 8, rngs=nnx.Rngs(0))
    mixed = nnx.Param(jnp.ones((4, 8)), out_sharding=("embed", "model"))
  assert layer.embedding.logical_axes == ("vocab", "embed")
  assert layer.embedding.sharding.spec == P(None, None)
  assert mixed.sharding.spec == P(None, "model")


def test_mixed_axis_types_raise():
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto, AxisType.Explicit))
  with pytest.raises(errors.ShardingError, match=r"mixes axis types") as info:
    nnx.Variable(jnp.ones((4, 4)), out_sharding=("a", "b"), mesh=mesh)
  assert isinstance(info.value, ValueError)


def test_use_sharding_rules_place_new_variables(mesh):
  rules = [("embed", "model"), ("mlp", "data")]
  with jax.set_mesh(mesh), nnx.use_sharding(mesh, rules):
    layer = nnx.Linear(8, 4, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(errors.AxisRulesError, match=r"No axis rule for logical name"):
      nnx.Param(jnp.ones((4,)), out_sharding=("unknown",))
  assert layer.kernel.sharding.spec == P("model", "data")
  np.testing.assert_array_equal(layer.kernel.value,
                                nnx.Linear(8, 4, rngs=nnx.Rngs(0)).kernel.value)  # same init


# --- partition specs and abstract models -----------------------------------------------

def test_partition_spec_and_named_sharding_by_flax_convention(mesh):
  model = nnx.Linear(8, 4, kernel_init=nnx.with_partitioning(
      nnx.initializers.lecun_normal(), (None, "model")), use_bias=False, rngs=nnx.Rngs(0))
  assert nnx.get_partition_spec(model)["kernel"].value == P(None, "model")
  assert nnx.get_named_sharding(model, mesh)["kernel"].value == NamedSharding(mesh, P(None, "model"))
  bad = nnx.Linear(8, 4, kernel_axes=("rows", "model"), use_bias=False, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShardingError, match=r"name axes the mesh \('data', 'model'\) "
                     r"lacks: kernel \['rows'\]"):
    nnx.get_named_sharding(bad, mesh)


def test_get_abstract_model_has_no_values_and_shardings(mesh):
  def init():
    return nnx.Linear(8, 4, kernel_axes=("data", "model"), rngs=nnx.Rngs(0))

  graphdef, abstract = nnx.get_abstract_model(init, mesh)
  kernel = abstract["kernel"].value
  assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape == (8, 4)
  assert kernel.sharding == NamedSharding(mesh, P("data", "model"))
  assert abstract["bias"].value.sharding == NamedSharding(mesh, P("model"))
  # Restoring into that layout: device_put the real state onto the abstract shardings.
  real = nnx.state(init())
  placed = jax.device_put(real, jax.tree.map(lambda a: a.sharding, abstract))
  model = nnx.merge(graphdef, placed)
  assert model.kernel.sharding == kernel.sharding


def test_as_abstract_uses_the_ambient_or_the_variables_mesh(mesh):
  other = _mesh(("c", "d"), shape=(1, 8))

  def init():
    m = nnx.Module()
    m.a = nnx.Linear(4, 8, kernel_axes=("data", "model"), rngs=nnx.Rngs(0))
    m.b = nnx.Linear(4, 8, use_bias=False, rngs=nnx.Rngs(0), kernel_init=nnx.with_metadata(
        nnx.initializers.lecun_normal(), out_sharding=("c", "d"), mesh=other))
    return m

  with jax.set_mesh(mesh):
    abstract = nnx.as_abstract(nnx.eval_shape(init))
  assert abstract.a.kernel.value.sharding == NamedSharding(mesh, P("data", "model"))
  assert abstract.b.kernel.value.sharding == NamedSharding(other, P("c", "d"))
  plain = nnx.as_abstract(nnx.eval_shape(lambda: nnx.Linear(4, 8, use_bias=False,
                                                             rngs=nnx.Rngs(0))))
  assert getattr(plain.kernel.value, "sharding", None) is None


# --- optimizer state ------------------------------------------------------------------

def test_optimizer_state_is_sharded_like_its_parameter(mesh):
  with jax.set_mesh(mesh), nnx.logical_axis_rules([("embed", "model")]):
    kept = nnx.Param(jnp.ones((8, 4)), out_sharding=("rows", "embed"),
                     sharding_rules=(("rows", "data"),))
    physical = nnx.Param(jnp.ones((8, 4)), out_sharding=P(None, "model"))
    zero = nnx.Param(jnp.ones((8, 4)), out_sharding=(None, "model"),
                     optimizer_sharding=("data", "model"))
    model = nnx.Dict(kept=kept, physical=physical, zero=zero)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  mu = opt.opt_state[0]["mu"]
  assert mu["kept"].sharding == NamedSharding(mesh, P("data", "model"))
  assert mu["physical"].sharding == NamedSharding(mesh, P(None, "model"))
  assert zero.sharding.spec == P(None, "model")
  assert mu["zero"].sharding == NamedSharding(mesh, P("data", "model"))


def test_get_abstract_model_inside_use_sharding_uses_the_rules():
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    _, abstract = nnx.get_abstract_model(
        lambda: nnx.Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0)), mesh)
  assert abstract["kernel"].value.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert abstract["bias"].value.sharding == NamedSharding(mesh, P("tensor"))
