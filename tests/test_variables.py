"""Tests for spmdnnx._variables: Variable types, value access, operators, metadata."""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Count(nnx.Variable):
  """A user-defined Variable type (used as a filter in several tests)."""


class LoRAParam(nnx.Param):
  """A user-defined Param subclass."""


# --- types -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [nnx.Variable, nnx.Param, nnx.BatchStat, nnx.Cache,
                                 nnx.Intermediate, Count, LoRAParam])
def test_variable_types_hold_value(cls):
  v = cls(jnp.arange(3.0))
  assert isinstance(v, nnx.Variable)
  assert type(v) is cls
  assert v.type is cls
  np.testing.assert_array_equal(v.value, [0.0, 1.0, 2.0])
  assert v.shape == (3,) and v.dtype == jnp.float32 and v.ndim == 1 and v.size == 3


def test_builtin_hierarchy():
  assert issubclass(nnx.Param, nnx.Variable)
  assert issubclass(nnx.BatchStat, nnx.Variable)
  assert issubclass(nnx.Cache, nnx.Variable)
  assert issubclass(nnx.Intermediate, nnx.Variable)
  assert not issubclass(nnx.BatchStat, nnx.Param)
  assert issubclass(LoRAParam, nnx.Param)


def test_user_subclass_kept_through_tree_map():
  v = Count(jnp.array(1), note="hi")
  out = jax.tree.map(lambda x: x + 1, v)
  assert type(out) is Count
  assert out is not v
  assert int(out.value) == 2
  assert out.note == "hi"
  assert int(v.value) == 1  # the original is untouched


def test_user_subclass_kept_through_split_merge():

  class M(nnx.Module):

    def __init__(self):
      self.c = Count(jnp.array(3))
      self.w = LoRAParam(jnp.ones(2))

  graphdef, state = nnx.split(M())
  assert type(state["c"]) is Count
  assert type(state["w"]) is LoRAParam
  m2 = nnx.merge(graphdef, state)
  assert type(m2.c) is Count and type(m2.w) is LoRAParam
  assert int(m2.c.value) == 3


def test_variable_from_variable_copies_value_and_metadata():
  a = nnx.Param(jnp.ones((2, 3)), logical_axes=("a", "b"), tag="x")
  b = nnx.BatchStat(a)
  assert type(b) is nnx.BatchStat
  assert b.logical_axes == ("a", "b") and b.tag == "x"
  assert b.value is a.value


# --- value access ------------------------------------------------------------------


def test_value_get_and_set():
  v = nnx.Param(jnp.zeros(2))
  v.value = jnp.ones(2)
  np.testing.assert_array_equal(v.value, [1.0, 1.0])
  v.set_value(jnp.full(2, 3.0))
  np.testing.assert_array_equal(v.get_value(), [3.0, 3.0])


def test_getitem_and_setitem_ellipsis():
  v = nnx.Param(jnp.arange(4.0))
  np.testing.assert_array_equal(v[...], [0.0, 1.0, 2.0, 3.0])
  assert float(v[2]) == 2.0
  np.testing.assert_array_equal(v[1:3], [1.0, 2.0])
  v[...] = jnp.full(4, 7.0)
  np.testing.assert_array_equal(v.value, [7.0] * 4)
  # A scalar broadcasts to the existing shape.
  v[...] = jnp.float32(2.0)
  assert v.value.shape == (4,)
  np.testing.assert_array_equal(v.value, [2.0] * 4)


def test_setitem_index_updates_functionally():
  v = nnx.Param(jnp.zeros(3))
  old = v.value
  v[1] = 5.0
  np.testing.assert_array_equal(v.value, [0.0, 5.0, 0.0])
  np.testing.assert_array_equal(old, [0.0, 0.0, 0.0])  # jax arrays are immutable


def test_setitem_on_non_array_value():
  v = nnx.Variable([1, 2, 3])
  v[0] = 10
  assert v.value == [10, 2, 3]


def test_python_conversions():
  assert float(nnx.Variable(jnp.array(2.5))) == 2.5
  assert int(nnx.Variable(jnp.array(3))) == 3
  assert bool(nnx.Variable(jnp.array(True))) is True
  assert operator.index(nnx.Variable(4)) == 4
  v = nnx.Param(jnp.arange(3))
  assert len(v) == 3
  assert [int(x) for x in v] == [0, 1, 2]
  np.testing.assert_array_equal(np.asarray(v), [0, 1, 2])


def test_variables_hash_by_identity():
  a = nnx.Param(jnp.ones(2))
  b = nnx.Param(jnp.ones(2))
  assert len({a, b, a}) == 2


def test_missing_attribute_message():
  v = nnx.Param(jnp.ones(2), foo=1)
  with pytest.raises(AttributeError, match="Param has no metadata or value attribute 'bar'"):
    v.bar  # noqa: B018


def test_value_attributes_forwarded():
  v = nnx.Param(jnp.ones((2, 3)))
  assert v.T.shape == (3, 2)
  assert float(v.sum()) == 6.0


# --- operators ---------------------------------------------------------------------

X = np.array([1.0, 2.0, 4.0], np.float32)


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul,
                                operator.truediv, operator.pow, operator.floordiv,
                                operator.mod, operator.lt, operator.le, operator.eq,
                                operator.ne, operator.gt, operator.ge])
def test_binary_float_operators(op):
  v = nnx.Param(jnp.asarray(X))
  other = jnp.asarray([2.0, 2.0, 2.0])
  np.testing.assert_allclose(op(v, other), op(jnp.asarray(X), other))
  np.testing.assert_allclose(op(other, v), op(other, jnp.asarray(X)))  # reflected
  np.testing.assert_allclose(op(v, v), op(jnp.asarray(X), jnp.asarray(X)))


@pytest.mark.parametrize("op", [operator.and_, operator.or_, operator.xor,
                                operator.lshift, operator.rshift])
def test_binary_int_operators(op):
  v = nnx.Variable(jnp.array([1, 6, 12]))
  other = jnp.array([3, 1, 2])
  np.testing.assert_array_equal(op(v, other), op(jnp.array([1, 6, 12]), other))
  np.testing.assert_array_equal(op(other, v), op(other, jnp.array([1, 6, 12])))


def test_python_scalar_operands_and_reflection():
  v = nnx.Param(jnp.asarray(X))
  np.testing.assert_allclose(v + 1.0, X + 1)
  np.testing.assert_allclose(1.0 + v, X + 1)
  np.testing.assert_allclose(10.0 - v, 10 - X)
  np.testing.assert_allclose(8.0 / v, 8 / X)
  np.testing.assert_allclose(2.0 ** v, 2 ** X)


def test_matmul_and_reflected_matmul():
  w = nnx.Param(jnp.arange(6.0).reshape(2, 3))
  x = jnp.ones((4, 2))
  np.testing.assert_allclose(x @ w, np.ones((4, 2)) @ np.arange(6.0).reshape(2, 3))
  np.testing.assert_allclose(w @ jnp.ones(3), [3.0, 12.0])


def test_divmod_and_unary():
  v = nnx.Variable(jnp.array([7, -3]))
  q, r = divmod(v, 2)
  np.testing.assert_array_equal(q, [3, -2])
  np.testing.assert_array_equal(r, [1, 1])
  q, r = divmod(jnp.array([9, 9]), v)
  np.testing.assert_array_equal(q, [1, -3])
  np.testing.assert_array_equal(-v, [-7, 3])
  np.testing.assert_array_equal(+v, [7, -3])
  np.testing.assert_array_equal(abs(v), [7, 3])
  np.testing.assert_array_equal(~v, [-8, 2])


def test_operator_results_are_arrays_not_variables():
  v = nnx.Param(jnp.ones(2))
  assert isinstance(v + 1.0, jax.Array)
  assert isinstance(-v, jax.Array)


@pytest.mark.parametrize("op,expected", [
    (operator.iadd, [3.0, 4.0]), (operator.isub, [-1.0, 0.0]),
    (operator.imul, [2.0, 4.0]), (operator.itruediv, [0.5, 1.0]),
    (operator.ipow, [1.0, 4.0]), (operator.imatmul, 6.0)])
def test_inplace_operators_mutate_same_variable(op, expected):
  v = nnx.Param(jnp.array([1.0, 2.0]), tag="t")
  alias = v
  other = jnp.array([2.0, 2.0])
  result = op(v, other)
  assert result is alias
  assert type(result) is nnx.Param
  assert result.tag == "t"
  np.testing.assert_allclose(alias.value, expected)


def test_inplace_on_module_attribute_keeps_identity():

  class Counter(nnx.Module):

    def __init__(self):
      self.count = Count(jnp.array(0))

    def __call__(self):
      self.count += 1

  m = Counter()
  ref = m.count
  m()
  m()
  assert m.count is ref
  assert type(m.count) is Count
  assert int(ref.value) == 2
  m.count.value += 1
  assert m.count is ref and int(ref.value) == 3


def test_assigning_array_to_variable_attribute_updates_in_place():

  class M(nnx.Module):

    def __init__(self):
      self.count = Count(jnp.array(0))

  m = M()
  ref = m.count
  m.count = m.count + 1  # plain array assigned over a Variable attribute
  assert m.count is ref
  assert int(ref.value) == 1


# --- metadata ----------------------------------------------------------------------


def test_arbitrary_metadata_readable_as_attributes():
  v = nnx.Param(jnp.ones(2), description="bias", lr_scale=0.5)
  assert v.description == "bias"
  assert v.lr_scale == 0.5
  assert v.get_metadata(exclude_required=True) == {"description": "bias", "lr_scale": 0.5}


def test_metadata_set_as_attribute_and_set_metadata():
  v = nnx.Param(jnp.ones(2))
  v.note = "x"
  assert v.note == "x"
  v.set_metadata(note="y", other=3)
  assert v.get_metadata(exclude_required=True) == {"note": "y", "other": 3}


def test_get_metadata_is_a_copy():
  v = nnx.Param(jnp.ones(2), a=1)
  v.get_metadata()["a"] = 2
  assert v.a == 1


def test_logical_axes_stored_as_tuple():
  v = nnx.Param(jnp.ones((2, 3)), logical_axes=["embed", None])
  assert v.logical_axes == ("embed", None)
  assert nnx.Param(jnp.ones(2)).logical_axes is None
  assert nnx.Param(jnp.ones(4), logical_axes="embed").logical_axes == ("embed",)


def test_logical_axes_wrong_length_error():
  with pytest.raises(errors.MetadataError,
                     match=r"Param: logical_axes \('embed',\) has 1 entries but the shape "
                     r"\(2, 3\) \(float32\) has 2 dimensions; give exactly one name "
                     r"\(or None\) per dimension"):
    nnx.Param(jnp.ones((2, 3)), logical_axes=("embed",))


def test_logical_axes_bad_entry_error():
  with pytest.raises(errors.MetadataError,
                     match=r"logical_axes \('embed', 3\) contains \[3\]; each entry must be "
                     r"a logical axis name \(str\) or None"):
    nnx.Param(jnp.ones((2, 3)), logical_axes=("embed", 3))


def test_logical_axes_not_a_sequence_error():
  with pytest.raises(errors.MetadataError, match=r"logical_axes must be a tuple .* got 5"):
    nnx.Param(jnp.ones(2), logical_axes=5)


def test_logical_axes_validated_when_set_later():
  v = nnx.Param(jnp.ones((2, 3)))
  v.logical_axes = ("a", "b")
  assert v.logical_axes == ("a", "b")
  with pytest.raises(errors.MetadataError, match=r"has 3 entries but the shape \(2, 3\)"):
    v.set_metadata(logical_axes=("a", "b", "c"))
  assert v.logical_axes == ("a", "b")  # unchanged after the failed update


def test_metadata_error_is_value_error():
  assert issubclass(errors.MetadataError, ValueError)
  assert issubclass(errors.MetadataError, errors.SpmdnnxError)


@pytest.mark.parametrize("alias", ["sharding", "out_sharding", "sharding_names"])
def test_flax_aliases(alias):
  v = nnx.Param(jnp.ones((2, 3)), **{alias: ("embed", "mlp")})
  assert v.logical_axes == ("embed", "mlp")
  # Flax: `.sharding` is the value's placement; the other two read the annotation.
  assert v.out_sharding == v.sharding_names == ("embed", "mlp")
  assert v.sharding == v.value.sharding
  assert "sharding" not in v.get_metadata() and "out_sharding" not in v.get_metadata()
  assert v.get_metadata()["logical_axes"] == ("embed", "mlp")


@pytest.mark.parametrize("alias", ["sharding", "out_sharding", "sharding_names"])
def test_alias_validated_against_ndim(alias):
  with pytest.raises(errors.MetadataError, match=r"has 3 entries but the shape \(2,\)"):
    nnx.Param(jnp.ones(2), **{alias: ("a", "b", "c")})


def test_conflicting_alias_error():
  with pytest.raises(errors.MetadataError,
                     match=r"Param: logical_axes=\('a', 'b'\) conflicts with "
                     r"sharding=\('c', 'd'\); pass only one of them"):
    nnx.Param(jnp.ones((2, 3)), logical_axes=("a", "b"), sharding=("c", "d"))


def test_agreeing_alias_is_accepted():
  v = nnx.Param(jnp.ones((2, 3)), logical_axes=("a", "b"), sharding=("a", "b"))
  assert v.logical_axes == ("a", "b")


def test_logical_axes_kept_through_replace():
  v = nnx.Param(jnp.ones((2, 3)), logical_axes=("a", "b"), tag="t")
  r = v.replace(jnp.zeros((2, 3)))
  assert type(r) is nnx.Param and r is not v
  assert r.logical_axes == ("a", "b") and r.tag == "t"
  np.testing.assert_array_equal(r.value, np.zeros((2, 3)))
  np.testing.assert_array_equal(v.value, np.ones((2, 3)))
  r2 = v.replace(logical_axes=("c", None))
  assert r2.logical_axes == ("c", None)
  assert v.copy().logical_axes == ("a", "b")


def test_replace_revalidates_logical_axes():
  v = nnx.Param(jnp.ones((2, 3)), logical_axes=("a", "b"))
  with pytest.raises(errors.MetadataError,
                     match=r"has 2 entries but the shape \(6,\) \(float32\) has 1 dimensions"):
    v.replace(jnp.ones(6))


def test_logical_axes_kept_through_tree_map_and_flatten():
  v = nnx.Param(jnp.ones((2, 3)), logical_axes=("a", "b"))
  out = jax.tree.map(lambda x: x * 2, v)
  assert out.logical_axes == ("a", "b")
  leaves, treedef = jax.tree.flatten(v)
  assert len(leaves) == 1 and leaves[0] is v.value
  back = jax.tree.unflatten(treedef, [jnp.zeros((2, 3))])
  assert type(back) is nnx.Param and back.logical_axes == ("a", "b")
  keyed, _ = jax.tree_util.tree_flatten_with_path(v)
  assert jax.tree_util.keystr(keyed[0][0]) == ".value"


def test_treedef_depends_on_metadata():
  a = jax.tree.structure(nnx.Param(jnp.ones(2), logical_axes=("x",)))
  b = jax.tree.structure(nnx.Param(jnp.ones(2), logical_axes=("y",)))
  c = jax.tree.structure(nnx.Param(jnp.zeros(2), logical_axes=("x",)))
  assert a != b
  assert a == c


def test_unhashable_metadata_survives_tree_map():
  v = nnx.Param(jnp.ones(2), info={"lr": [1, 2]})
  out = jax.tree.map(lambda x: x, v)
  assert out.info == {"lr": [1, 2]}


def test_logical_axes_kept_through_split_merge():

  class M(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 3)), logical_axes=("embed", "mlp"), note="n")

  graphdef, state = nnx.split(M())
  assert state["w"].logical_axes == ("embed", "mlp")
  m = nnx.merge(graphdef, state)
  assert m.w.logical_axes == ("embed", "mlp") and m.w.note == "n"
  m = nnx.merge(graphdef, jax.tree.map(lambda x: x + 1, state))
  assert m.w.logical_axes == ("embed", "mlp")
  np.testing.assert_array_equal(m.w.value, np.full((2, 3), 2.0))


def test_repr_shows_value_and_metadata():
  v = nnx.Param(jnp.array([1.0, 2.0]), logical_axes=("embed",))
  text = repr(v)
  assert text.startswith("Param(value=Array([1., 2.], dtype=float32)")
  assert "logical_axes=('embed',)" in text
  big = nnx.Param(jnp.zeros((4, 8)))
  assert repr(big) == "Param(value=Array(shape=(4, 8), dtype=float32))"


# --- with_partitioning -------------------------------------------------------------


def test_with_partitioning_wraps_initializer():
  init = nnx.with_partitioning(jax.nn.initializers.ones, ("embed", "mlp"))
  x = init(jax.random.key(0), (2, 3), jnp.float32)
  assert isinstance(x, nnx.VariableMetadata)
  np.testing.assert_array_equal(x.raw_value, np.ones((2, 3)))
  assert init.metadata == {"logical_axes": ("embed", "mlp")}
  assert x.metadata == {"logical_axes": ("embed", "mlp")}
  p = nnx.Param(x)  # Flax's spelling: the box carries the names into the Param
  assert p.logical_axes == ("embed", "mlp")
  np.testing.assert_array_equal(p.value, np.ones((2, 3)))


def test_with_partitioning_box_keywords_win_and_are_checked():
  init = nnx.with_metadata(jax.nn.initializers.ones, note="box", logical_axes=("a",))
  p = nnx.Param(init(jax.random.key(0), (2,)), note="kw")
  assert (p.note, p.logical_axes) == ("kw", ("a",))
  with pytest.raises(errors.MetadataError, match=r"conflicts with out_sharding=\('b',\)"):
    nnx.Param(init(jax.random.key(0), (2,)), out_sharding=("b",))


def test_with_partitioning_single_name_and_extra_metadata():
  init = nnx.with_partitioning(jax.nn.initializers.zeros, "embed", note="n")
  assert init.metadata == {"logical_axes": ("embed",), "note": "n"}


def test_with_partitioning_nested_with_metadata():
  init = nnx.with_partitioning(nnx.with_metadata(jax.nn.initializers.ones, a=1), ("x",))
  assert init.metadata == {"a": 1, "logical_axes": ("x",)}
  np.testing.assert_array_equal(init(jax.random.key(0), (2,)).raw_value, [1.0, 1.0])


def test_with_partitioning_axes_checked_when_param_made():
  init = nnx.with_partitioning(jax.nn.initializers.ones, ("embed", "mlp"))
  x = init(jax.random.key(0), (4,), jnp.float32)
  with pytest.raises(errors.MetadataError, match=r"has 2 entries but the shape \(4,\)"):
    nnx.Param(x)


# --- the one Variable factory (issue 9) ------------------------------------------


def test_no_module_but_variables_writes_variable_private_slots():
  import pathlib
  import re
  root = pathlib.Path(nnx.__file__).parent
  pattern = re.compile(r"""object\.__setattr__\([^,]+,\s*["'](_meta|_frozen|_trace|_watched|raw_value)["']""")
  offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if p.name != "_variables.py" and pattern.search(p.read_text())]
  assert offenders == []


def test_detach_shares_value_and_metadata_but_not_identity():
  from spmdnnx import _variables
  w = nnx.Param(jnp.ones(2), logical_axes=("embed",), note="x")
  d = _variables.detach(w)
  assert d is not w and type(d) is nnx.Param
  assert d.raw_value is w.raw_value and d.logical_axes == ("embed",) and d.note == "x"
  d.set_metadata(note="y")
  assert w.note == "x"  # metadata dicts are not shared after a change
  moved = _variables.detach(w, jnp.zeros(3))
  assert moved.value.tolist() == [0.0, 0.0, 0.0] and moved.logical_axes == ("embed",)


def test_write_back_updates_value_and_changed_metadata_in_place():
  from spmdnnx import _variables
  w = nnx.Param(jnp.ones(2), logical_axes=("embed",))
  _variables.write_back(w, nnx.Param(jnp.zeros(2), logical_axes=("mlp",)))
  assert w.value.tolist() == [0.0, 0.0] and w.logical_axes == ("mlp",)
  _variables.write_back(w, jnp.full((2,), 3.0))
  assert w.value.tolist() == [3.0, 3.0] and w.logical_axes == ("mlp",)


def test_variable_can_be_passed_to_jnp_functions():
  # BUILD_NOTES once said it could not (jax 0.10); it can.
  w = nnx.Param(jnp.array([0.0, 1.0]))
  assert jnp.sin(w).tolist() == pytest.approx([0.0, 0.8414709848])
  assert jnp.sum(w).item() == 1.0
