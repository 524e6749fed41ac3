"""Flax's spellings of sharding metadata: short axes tuples, deferred checks,
`VariableMetadata` initializers, axis hooks and `transform_metadata`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors


def _mesh(shape=(2, 2), names=("model", "data")):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                       devices=jax.devices()[:int(np.prod(shape))])


# --- axes shorter than the rank ------------------------------------------------------

def test_short_flax_axes_are_kept_as_given_and_padded_for_sharding():
  v = nnx.Param(jnp.ones((4, 2, 2)), out_sharding=("model", "data"))
  assert v.out_sharding == ("model", "data")  # as the user wrote it (Flax)
  assert v.logical_axes == ("model", "data", None)  # what the resolver sees
  assert nnx.get_partition_spec(v).value == P("model", "data", None)
  v.set_metadata(note=1)  # re-validated metadata keeps both
  assert (v.out_sharding, v.logical_axes) == (("model", "data"), ("model", "data", None))
  with jax.set_mesh(_mesh()):
    w = nnx.Param(jnp.ones((4, 2, 2)), out_sharding=("model",))
  assert w.value.sharding.shard_shape(w.shape) == (2, 2, 2)


def test_short_axes_in_layer_metadata():
  layer = nnx.LinearGeneral(2, (3, 4), kernel_metadata={"out_sharding": ("din", "dout")},
                            rngs=nnx.Rngs(0))
  assert layer.kernel.out_sharding == ("din", "dout")
  assert layer.kernel.logical_axes == ("din", "dout", None)


def test_our_logical_axes_stay_one_per_dimension():
  with pytest.raises(errors.MetadataError, match=r"logical_axes \('a',\) has 1 entries but "
                     r"the shape \(2, 2\) \(float32\) has 2 dimensions"):
    nnx.Param(jnp.ones((2, 2)), logical_axes=("a",))
  with pytest.raises(errors.MetadataError, match=r"has 3 entries but the shape \(2, 2\)"):
    nnx.Param(jnp.ones((2, 2)), out_sharding=("a", "b", "c"))  # longer: always refused


def test_eager_sharding_false_defers_the_rank_check_to_the_resolver():
  v = nnx.Param(jnp.array(0), out_sharding=("din", "dout"), eager_sharding=False)
  assert v.out_sharding == ("din", "dout")
  with pytest.raises(errors.MetadataError, match=r"logical_axes length differs from the "
                     r"array rank for: <root> \(axes \('din', 'dout'\), shape \(\)\)"):
    with nnx.use_sharding(_mesh(), [("din", "model"), ("dout", "data")]):
      nnx.get_partition_spec(v)


# --- VariableMetadata initializers -----------------------------------------------------

def test_with_partitioning_box_shards_a_param_made_inside_jit():
  mesh = _mesh()

  @jax.jit
  def make():
    init = nnx.with_partitioning(lambda: jnp.ones((8, 2)), sharding=("model", "data"))
    return nnx.Param(init()).value

  with jax.set_mesh(mesh):
    w = make()
  assert w.sharding.shard_shape(w.shape) == (4, 1)


def test_sharding_rules_metadata_from_the_initializer():
  init = nnx.with_partitioning(lambda: jnp.ones((8, 2)), sharding=("row-alias", "col-alias"),
                               sharding_rules=(("row-alias", "model"),))
  with jax.set_mesh(_mesh()), nnx.logical_axis_rules((("col-alias", "data"),)):
    w = nnx.Param(init())
  assert w.value.sharding.spec == P("model", "data")


# --- axis hooks and extra transform metadata in vmap / scan -----------------------------

def test_vmap_and_scan_call_axis_hooks_and_move_extra_fields():
  calls = []

  class Hooked(nnx.Param):

    def add_axis(self, axis_index, axis_name):
      calls.append(("add", axis_index, axis_name))
      super().add_axis(axis_index, axis_name)

    def remove_axis(self, axis_index, axis_name):
      calls.append(("remove", axis_index, axis_name))
      super().remove_axis(axis_index, axis_name)

  seen = {}

  class Block(nnx.Module):

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0, 0), transform_metadata={nnx.PARTITION_NAME: "layers", "nickname": "n"})
    def __init__(self, rngs):
      self.w = Hooked(jax.random.normal(rngs.params(), (2, 2)), out_sharding=("a", "b"),
                      nickname=("x", "y"))

    @nnx.scan(in_axes=(0, nnx.Carry), transform_metadata={nnx.PARTITION_NAME: "layers"})
    def __call__(self, x):
      seen["inside"] = (self.w.shape, self.w.out_sharding)
      return x @ self.w, None

  m = Block(nnx.Rngs(0))
  assert m.w.out_sharding == ("layers", "a", "b")
  assert m.w.nickname == ("n", "x", "y")
  assert calls == [("add", 0, "layers")]
  y, _ = m(jnp.ones((1, 2)))
  assert seen["inside"] == ((2, 2), ("a", "b"))
  assert calls == [("add", 0, "layers"), ("remove", 0, "layers"), ("add", 0, "layers")]
  expected = np.ones((1, 2))
  for i in range(3):
    expected = expected @ np.asarray(m.w.value[i])
  np.testing.assert_allclose(y, expected, rtol=1e-5)


def test_transform_metadata_called_directly_moves_the_axis():

  @nnx.transform_metadata(in_axes=0, out_axes=1, partition="din")
  def f(v):
    v[...] += 1
    assert v.out_sharding == ("dout",)
    return nnx.Param(jnp.array(10), out_sharding=("dmid", "dout"), eager_sharding=False)

  v = nnx.Param(jnp.array(0), out_sharding=("din", "dout"), eager_sharding=False)
  out = f(v)
  assert v.out_sharding == ("din", "dout") and int(v[...]) == 1
  assert out.out_sharding == ("dmid", "din", "dout") and int(out[...]) == 10


def test_transform_metadata_restores_inputs_when_the_function_raises():

  @nnx.transform_metadata(in_axes=0, partition="layers")
  def f(v):
    raise RuntimeError("boom")

  v = nnx.Param(jnp.ones((3, 2)), out_sharding=("layers", "embed"))
  with pytest.raises(RuntimeError, match="boom"):
    f(v)
  assert v.logical_axes == ("layers", "embed")
