"""Tests for spmdnnx.spmd._rules: resolution semantics, composition, files."""

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spmdnnx import errors
from spmdnnx.spmd._rules import LOGICAL_AXES, AxisRules

CLASSIC = [("head", "model"), ("embed", "model"), ("embed", "data"), ("vocab", "model")]
MESH = {"data": 2, "model": 4}
FT = {"data": 1, "stage": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 2}
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "sharding.md"


def test_classic_case_specs():
  rules = AxisRules(CLASSIC)
  assert rules.resolve(("embed", "head"), (8, 8), MESH) == P("data", "model")
  assert rules.resolve(("vocab", "embed"), (8, 8), MESH) == P(None, "model")


def test_classic_case_real_array_shardings():
  rules = AxisRules(CLASSIC)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  x = jax.device_put(jnp.zeros((8, 8)),
                     NamedSharding(mesh, rules.resolve(("embed", "head"), (8, 8), mesh)))
  assert x.sharding.spec == P("data", "model")
  assert x.addressable_shards[0].data.shape == (4, 2)
  y = jax.device_put(jnp.zeros((8, 8)),
                     NamedSharding(mesh, rules.resolve(("vocab", "embed"), (8, 8), mesh)))
  assert y.addressable_shards[0].data.shape == (8, 2)


def test_fallback_to_next_rule_when_product_does_not_divide():
  rules = AxisRules([("embed", ("fsdp", "tensor")), ("embed", "fsdp")])
  assert rules.resolve(("embed",), (8,), FT) == P(("fsdp", "tensor"))
  assert rules.resolve(("embed",), (4,), FT) == P("fsdp")


def test_no_rule_divides_warns_with_path_and_replicates():
  rules = AxisRules([("embed", ("fsdp", "tensor")), ("embed", "fsdp")])
  with pytest.warns(errors.ShardingWarning,
                    match=r"layers/0/w dim 0 \('embed', size 6; tried \(fsdp, tensor\)=8, "
                          r"fsdp=4\)"):
    spec = rules.resolve(("embed",), (6,), FT, path=("layers", 0, "w"))
  assert spec == P(None)


def test_fallback_onto_size_one_axis_still_warns():
  rules = AxisRules([("batch", ("data", "fsdp")), ("batch", "data")])
  with pytest.warns(errors.ShardingWarning, match=r"x dim 0 \('batch', size 6"):
    assert rules.resolve(("batch",), (6,), FT, path=("x",)) == P("data")


def test_explicit_none_fallback_is_silent():
  rules = AxisRules([("embed", "fsdp"), ("embed", None)])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert rules.resolve(("embed",), (6,), FT) == P(None)


def test_none_rule_takes_priority():
  rules = AxisRules([("embed", None), ("embed", "fsdp")])
  assert rules.resolve(("embed", "embed"), (8, 8), FT) == P(None, None)


def test_mesh_axis_never_used_twice_in_one_array():
  rules = AxisRules([("embed", "fsdp"), ("mlp", "fsdp")])
  assert rules.resolve(("embed", "embed"), (8, 8), FT) == P("fsdp", None)
  assert rules.resolve(("mlp", "embed"), (8, 8), FT) == P(None, "fsdp")


def test_scalar_and_none_axes():
  rules = AxisRules([("embed", "fsdp")])
  assert rules.resolve((), (), FT) == P()
  assert rules.resolve((None, "embed"), (3, 8), FT) == P(None, "fsdp")


def test_unknown_name_raises_with_path():
  rules = AxisRules([("embed", "fsdp")])
  with pytest.raises(errors.AxisRulesError,
                     match=r"No axis rule for logical name\(s\) \['mlpp'\]; used by: "
                           r"layers/0/kernel \['mlpp'\]"):
    rules.resolve(("embed", "mlpp"), (8, 8), FT, path=("layers", 0, "kernel"))


def test_allow_unknown_replicates():
  rules = AxisRules([("embed", "fsdp")], allow_unknown=True)
  assert rules.resolve(("embed", "mlpp"), (8, 8), FT) == P("fsdp", None)
  assert "unknown names replicate" in str(rules)
  assert AxisRules(rules).allow_unknown


def test_rank_mismatch_raises():
  with pytest.raises(errors.MetadataError,
                     match=r"w: logical_axes \('embed',\) has 1 entries but the array has "
                           r"shape \(8, 8\)"):
    AxisRules([("embed", "fsdp")]).resolve(("embed",), (8, 8), FT, path=("w",))


def test_missing_mesh_axis_in_resolve_raises():
  with pytest.raises(errors.AxisRulesError,
                     match=r"name mesh axes \['model'\] that the mesh lacks \(needed by w\)"):
    AxisRules([("embed", "model")]).resolve(("embed",), (8,), FT, path=("w",))


def test_validate_lists_every_missing_axis():
  rules = AxisRules(CLASSIC, name="classic")
  with pytest.raises(errors.AxisRulesError,
                     match=r"Axis rules 'classic' name mesh axes the mesh does not have: "
                           r"\('head' -> model\) names 'model', .*\('embed' -> data\) names "
                           r"'data'.*The mesh has axes \('fsdp', 'tensor'\)"):
    rules.validate({"fsdp": 4, "tensor": 2})
  rules.validate(MESH)


@pytest.mark.parametrize("bad, match", [
    ([("embed",)], r"entry 0 \('embed',\) is not a \(logical_name, mesh_axes\) pair"),
    ([(3, "fsdp")], r"entry 0 \(3, 'fsdp'\): logical name must be a non-empty str"),
    ([("embed", 3)], r"entry 0 \('embed', 3\): mesh axes must be a str"),
    ([("embed", ("data", "data"))], r"uses mesh axis 'data' twice"),
])
def test_malformed_rules_raise(bad, match):
  with pytest.raises(errors.AxisRulesError, match=match):
    AxisRules(bad)


def test_malformed_rules_lists_all_entries():
  with pytest.raises(errors.AxisRulesError, match=r"entry 0 .*entry 2"):
    AxisRules([("a",), ("b", "x"), ("c", ("y", "y"))])


def test_string_instead_of_rules_suggests_load():
  with pytest.raises(errors.AxisRulesError, match=r"AxisRules.load\('fsdp'\)"):
    AxisRules("fsdp")


def test_normalization_and_dict_input():
  rules = AxisRules({"batch": ["data", "fsdp"], "embed": ("fsdp",), "norm": ()})
  assert rules.rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("norm", None))
  assert rules.names == {"batch", "embed", "norm"}
  assert rules.mesh_axis_names == ("data", "fsdp")
  assert "embed" in rules and len(rules) == 3


def test_add_keeps_left_priority():
  a = AxisRules([("embed", "fsdp")])
  b = AxisRules([("embed", "tensor"), ("mlp", "tensor")], allow_unknown=True)
  c = a + b
  assert c.lookup("embed") == ("fsdp", "tensor")
  assert c.allow_unknown
  assert ([("x", None)] + a).rules == (("x", None), ("embed", "fsdp"))
  assert (a + [("x", None)]).rules == (("embed", "fsdp"), ("x", None))


def test_override_replaces_in_place_and_appends():
  base = AxisRules([("batch", "data"), ("embed", "fsdp"), ("embed", "data"), ("mlp", "tensor")],
                   name="base")
  out = base.override([("embed", "tensor"), ("embed", None)], vocab="tensor")
  assert out.rules == (("batch", "data"), ("embed", "tensor"), ("embed", None),
                       ("mlp", "tensor"), ("vocab", "tensor"))
  assert out.name == "base"
  assert base.override(mlp=None).lookup("mlp") == (None,)


def test_repr_round_trips_and_str_is_a_table():
  rules = AxisRules([("batch", ("data", "fsdp")), ("embed", None)])
  assert eval(repr(rules), {"AxisRules": AxisRules}) == rules
  text = str(AxisRules(rules, name="mine"))
  assert text.splitlines() == ["AxisRules 'mine' (2 rules)",
                               "  batch -> (data, fsdp)",
                               "  embed -> None (replicate)"]


def test_eq_and_hash():
  assert AxisRules(CLASSIC) == AxisRules(list(CLASSIC))
  assert hash(AxisRules(CLASSIC)) == hash(AxisRules(CLASSIC))
  assert AxisRules(CLASSIC) != AxisRules(CLASSIC, allow_unknown=True)


def test_json_round_trip_and_load_by_path(tmp_path):
  rules = AxisRules([("batch", ("data", "fsdp")), ("embed", None)], allow_unknown=True)
  path = tmp_path / "mine.json"
  path.write_text(json.dumps(rules.to_json()))
  loaded = AxisRules.load(path)
  assert loaded == rules and loaded.name == "mine"
  assert AxisRules.from_json([["a", "b"]]).rules == (("a", "b"),)


def test_load_errors(tmp_path):
  with pytest.raises(errors.AxisRulesError, match=r"No axis-rules file .*nope.json.*Shipped "
                                                  r"rule sets: dp, fsdp, fsdp_tp, fsdp_tp_sp"):
    AxisRules.load("nope")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(errors.AxisRulesError, match=r"bad.json' is not valid JSON"):
    AxisRules.load(bad)
  bad.write_text('{"name": "x"}')
  with pytest.raises(errors.AxisRulesError, match=r"has no 'rules' key"):
    AxisRules.load(bad)


@pytest.mark.parametrize("name", ["dp", "fsdp", "fsdp_tp", "fsdp_tp_sp"])
def test_presets_cover_the_vocabulary(name):
  rules = AxisRules.load(name)
  assert rules.name == name
  assert set(LOGICAL_AXES) <= rules.names, set(LOGICAL_AXES) - rules.names
  rules.validate(FT)


def test_vocabulary_is_documented():
  text = DOCS.read_text()
  for name in LOGICAL_AXES:
    assert f"`{name}`" in text, name


def test_presets_resolve_a_transformer_block():
  mesh = dict(FT, sequence=2, fsdp=2)
  tp = AxisRules.load("fsdp_tp")
  assert tp.resolve(("embed", "mlp"), (16, 64), FT) == P("fsdp", "tensor")
  assert tp.resolve(("embed", "heads", "kv"), (16, 4, 8), FT) == P("fsdp", "tensor", None)
  with pytest.warns(errors.ShardingWarning, match=r"dim 1 \('heads', size 3; tried tensor=2\)"):
    assert tp.resolve(("embed", "heads", "kv"), (16, 3, 8), FT) == P("fsdp", None, "tensor")
  assert tp.resolve(("vocab", "embed"), (32, 16), FT) == P("tensor", "fsdp")
  assert tp.resolve(("batch", "length", "embed"), (8, 4, 16), FT) == P(
      ("data", "fsdp"), None, None)
  sp = AxisRules.load("fsdp_tp_sp")
  assert sp.resolve(("batch", "length", "embed"), (8, 4, 16), mesh) == P(
      ("data", "fsdp"), "sequence", None)
  assert sp.resolve(("embed", "mlp"), (16, 64), mesh) == P(("fsdp", "sequence"), "tensor")
  assert AxisRules.load("dp").resolve(("embed", "mlp"), (16, 64), FT) == P(None, None)
  assert AxisRules.load("fsdp").resolve(("embed", "mlp"), (16, 64), FT) == P("fsdp", None)
