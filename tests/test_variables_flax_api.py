"""Flax NNX 0.12 Variable API in spmdnnx: typing, defaults, raw access, hooks."""

import typing
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


# --- typing names --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [nnx.Variable, nnx.Param, nnx.BatchStat, nnx.Cache,
                                 nnx.Intermediate, nnx.Perturbation, nnx.RngState,
                                 nnx.RngKey, nnx.RngCount, nnx.OptState])
def test_every_builtin_variable_type_is_subscriptable(cls):
  alias = cls[jax.Array]
  assert typing.get_origin(alias) is cls
  assert typing.get_args(alias) == (jax.Array,)


def test_subclass_of_subscripted_variable_is_a_variable_type():

  class Broadcast(nnx.Variable[nnx.A]):
    pass

  v = Broadcast(jnp.ones(2))
  assert isinstance(v, nnx.Variable) and type(v) is Broadcast
  leaves, treedef = jax.tree.flatten(v)
  assert type(jax.tree.unflatten(treedef, leaves)) is Broadcast
  # the subclass is itself generic
  assert typing.get_origin(Broadcast[int]) is Broadcast


def test_instance_of_subscripted_type_gets_no_stray_metadata():
  v = nnx.Param[jax.Array](jnp.zeros(2))
  assert type(v) is nnx.Param
  assert "__orig_class__" not in v.get_metadata(exclude_required=True)


def test_initializer_type_name():
  init: nnx.Initializer = nnx.initializers.lecun_normal()
  assert init(jax.random.key(0), (2, 3)).shape == (2, 3)


@pytest.mark.parametrize("cls", [nnx.Variable, nnx.Param])
def test_variables_are_weak_referenceable(cls):
  v = cls(jnp.ones(2))
  ref = weakref.ref(v)
  assert ref() is v
  del v
  assert ref() is None


# --- var_defaults --------------------------------------------------------------------


def test_var_defaults_read():
  d = nnx.var_defaults()
  assert d.hijax is False and d.ref is False
  assert dict(d) == {"hijax": False, "ref": False}


def test_var_defaults_as_context_restores():
  with nnx.var_defaults(hijax=True):
    assert nnx.var_defaults().hijax is True
    v = nnx.Variable(jnp.ones(()))
    with nnx.var_defaults(hijax=False):
      assert nnx.var_defaults().hijax is False
    assert nnx.var_defaults().hijax is True
  assert nnx.var_defaults().hijax is False
  assert v.get_metadata("hijax") is True
  assert nnx.Variable(1).get_metadata("hijax") is False


def test_var_defaults_set_now_inside_block_is_undone_by_block():
  with nnx.var_defaults(hijax=False):
    nnx.var_defaults(hijax=True)
    assert nnx.var_defaults().hijax is True
  assert nnx.var_defaults().hijax is False


def test_var_defaults_as_decorator_applies_per_call():

  @nnx.var_defaults(hijax=True)
  def make():
    return nnx.var_defaults().hijax

  assert nnx.var_defaults().hijax is False
  assert make() is True
  assert nnx.var_defaults().hijax is False


def test_ref_variables_are_rejected():
  with pytest.raises(errors.MetadataError, match="ref=True"):
    nnx.Variable(jnp.ones(()), ref=True)
  with nnx.var_defaults(ref=True):
    with pytest.raises(errors.MetadataError, match="jax.Ref"):
      nnx.Param(jnp.ones(()))


# --- metadata ------------------------------------------------------------------------


def test_required_metadata_defaults_and_exclusion():
  v = nnx.Variable(jnp.array(1.0))
  assert v.get_metadata() == {"hijax": False, "ref": False, "eager_sharding": True}
  assert v.get_metadata(exclude_required=True) == {}
  assert v.has_metadata("ref") and not v.has_metadata("note")
  assert v.hijax is False and v.ref is False and v.eager_sharding is True


def test_required_metadata_does_not_change_the_treedef():
  v = nnx.Param(jnp.ones(2), note="n")
  copy = nnx.Param(jnp.ones(2), **v.get_metadata())
  assert jax.tree.structure(copy) == jax.tree.structure(v)


def test_get_metadata_missing_name():
  v = nnx.Param(jnp.ones(2), note="n")
  assert v.get_metadata("x", default=10) == 10
  assert v.get_metadata("x", None) is None
  with pytest.raises(errors.MissingMetadataError, match=r"Param has no metadata 'x'; it has "
                     r"\['eager_sharding', 'hijax', 'note', 'ref'\]\. Pass a default"):
    v.get_metadata("x")
  with pytest.raises(KeyError):
    v.get_metadata("x")
  with pytest.raises(errors.MetadataError, match="either a name or exclude_required"):
    v.get_metadata("note", exclude_required=True)
  with pytest.raises(errors.MetadataError, match="default=1 needs a name"):
    v.get_metadata(default=1)


def test_set_metadata_three_forms():
  v = nnx.Variable(jnp.array(1.0))
  v.set_metadata(a=1, b=2)
  v.set_metadata("c", 3)
  assert v.get_metadata(exclude_required=True) == {"a": 1, "b": 2, "c": 3}
  v.set_metadata({"b": 3, "hijax": False, "ref": False, "eager_sharding": True})
  assert v.get_metadata() == {"b": 3, "hijax": False, "ref": False, "eager_sharding": True}
  with nnx.var_defaults(hijax=True):  # required entries are kept, not re-defaulted
    v.set_metadata(c=1)
    v.set_metadata({"d": 2})
  assert v.get_metadata("hijax") is False


def test_set_metadata_errors():
  v = nnx.Variable(jnp.array(1.0))
  with pytest.raises(errors.MetadataError, match=r"ref=True \(a Variable backed by a jax.Ref\)"):
    v.set_metadata({"ref": True})
  with pytest.raises(errors.MetadataError, match="not positional and keyword arguments"):
    v.set_metadata({"a": 1}, b=2)
  with pytest.raises(errors.MetadataError, match="must be a dict of metadata, got int"):
    v.set_metadata(3)
  with pytest.raises(errors.MetadataError, match=r"name must be a str, got 3"):
    v.set_metadata(3, 4)
  with pytest.raises(errors.MetadataError, match="got 3 positional arguments"):
    v.set_metadata("a", 1, 2)


def test_set_metadata_by_name_validates_logical_axes():
  v = nnx.Param(jnp.ones((2, 3)))
  v.set_metadata("logical_axes", ("embed", "mlp"))
  assert v.logical_axes == ("embed", "mlp")
  with pytest.raises(errors.MetadataError, match="has 1 entries but the shape"):
    v.set_metadata("logical_axes", ("embed",))


def test_del_metadata():
  v = nnx.Param(jnp.ones(2), note="n")
  v.del_metadata("note")
  assert not v.has_metadata("note")
  with pytest.raises(errors.MetadataError, match="cannot delete the required 'hijax'"):
    v.del_metadata("hijax")
  with pytest.raises(errors.MissingMetadataError, match="no metadata 'note' to delete"):
    v.del_metadata("note")


# --- value access --------------------------------------------------------------------


def test_raw_value_access():
  v = nnx.Param(jnp.ones(2))
  assert v.get_raw_value() is v.raw_value
  v.set_raw_value(jnp.zeros(3))
  assert v.get_raw_value().shape == (3,)


def test_scalar_python_values_support_ellipsis():
  v = nnx.BatchStat(1)
  assert v[...] == 1
  v[...] = 3
  assert v.get_value() == 3 and v.value == 3


def test_setitem_ellipsis_keeps_dtype_and_shape_like_flax():
  v = nnx.Param(jnp.zeros((2,), jnp.float32))
  with jax.numpy_dtype_promotion("standard"):
    v[...] = jnp.array(1.5, jnp.bfloat16)  # broadcast and cast to the stored dtype
  assert v.value.dtype == jnp.float32
  np.testing.assert_array_equal(v.value, [1.5, 1.5])
  same = jnp.ones((2,), jnp.float32)
  v[...] = same
  assert v.raw_value is same  # same shape and dtype: stored as is


class Doubled(nnx.Variable[nnx.A]):
  """Stores half of what it is given; reads it back doubled."""

  def get_value(self, *, index=nnx._variables.MISSING):
    value = super().get_value(index=index)
    return value * 2

  def set_value(self, value, *, index=nnx._variables.MISSING):
    super().set_value(value / 2, index=index)


def test_get_value_and_set_value_overrides_are_honoured_everywhere():
  v = Doubled(jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(v.value, [2.0, 4.0])
  np.testing.assert_allclose(v[...], [2.0, 4.0])
  np.testing.assert_allclose(v[1], 4.0)
  np.testing.assert_allclose(v + 1, [3.0, 5.0])
  np.testing.assert_allclose(jnp.asarray(v), [2.0, 4.0])
  v.value = jnp.array([8.0, 8.0])
  np.testing.assert_allclose(v.raw_value, [4.0, 4.0])
  v[...] = jnp.array([2.0, 2.0])
  np.testing.assert_allclose(v.raw_value, [1.0, 1.0])
  v += 2.0  # reads 2.0 + 2.0, stores half
  np.testing.assert_allclose(v.raw_value, [2.0, 2.0])


def test_value_hooks_in_metadata_and_create_value():
  calls = []

  def on_get(var, value):
    calls.append("get")
    return value + 1

  v = nnx.Variable(jnp.array(1.0), on_get_value=on_get,
                   on_set_value=lambda var, value: value * 10)
  assert float(v[...]) == 2.0 and calls == ["get"]
  v.value = jnp.array(2.0)
  assert float(v.raw_value) == 20.0

  class Clipped(nnx.Variable):

    def create_value(self, value):
      return jnp.clip(value, 0, 1)

  np.testing.assert_allclose(Clipped(jnp.array([-1.0, 2.0])).raw_value, [0.0, 1.0])


def test_proxy_call_and_contains():
  v = nnx.Variable(lambda x: x + 1)
  assert v(1) == 2
  assert 2 in nnx.Variable([1, 2])


def test_delitem_on_container_value():
  v = nnx.Variable({"a": 1, "b": 2})
  del v["a"]
  assert v.get_value() == {"b": 2}


def test_copy_replace_and_copy_from():
  v = nnx.Param(jnp.ones(2), note="a")
  c = v.copy(note="b")
  assert type(c) is nnx.Param and c.note == "b" and v.note == "a" and c is not v
  c2 = v.copy(value=jnp.zeros(2))
  np.testing.assert_array_equal(c2.value, [0.0, 0.0])
  target = nnx.Param(jnp.zeros(3))
  target.copy_from(v)
  np.testing.assert_array_equal(target.value, [1.0, 1.0])
  assert target.note == "a"
  with pytest.raises(errors.MetadataError, match="cannot copy a BatchStat into a Param"):
    target.copy_from(nnx.BatchStat(jnp.ones(2)))


def test_from_metadata_validates():
  v = nnx.Param.from_metadata(jnp.ones((2, 3)), {"logical_axes": ("a", "b"), "hijax": False})
  assert v.logical_axes == ("a", "b")
  with pytest.raises(errors.MetadataError, match="has 1 entries"):
    nnx.Param.from_metadata(jnp.ones((2, 3)), {"logical_axes": ("a",)})
