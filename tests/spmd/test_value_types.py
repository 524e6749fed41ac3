"""AxisRules and MeshConfig are validated once and immutable after."""

import copy
import dataclasses
import pickle

import pytest

from spmdnnx import errors
from spmdnnx.spmd._mesh import MeshConfig
from spmdnnx.spmd._rules import AxisRules


def test_axis_rules_reject_attribute_assignment():
  rules = AxisRules.load("fsdp_tp")
  for attr, value in [("allow_unknown", True), ("name", "x"), ("_rules", ()),
                      ("_allow_unknown", True), ("new_attr", 1)]:
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"AxisRules is immutable"):
      setattr(rules, attr, value)
  with pytest.raises(dataclasses.FrozenInstanceError, match=r"cannot delete 'name'"):
    del rules.name
  assert rules.allow_unknown is False and rules.name == "fsdp_tp"


def test_axis_rules_replace_revalidates():
  rules = AxisRules([("embed", "fsdp")], name="mine")
  loose = rules.replace(allow_unknown=True)
  assert loose.allow_unknown and loose.name == "mine" and loose.rules == rules.rules
  assert not rules.allow_unknown
  assert loose != rules and hash(loose) != hash(rules)
  assert rules.replace(rules=[("mlp", None)]).rules == (("mlp", None),)
  with pytest.raises(errors.AxisRulesError, match=r"entry 0 \('mlp', \('a', 'a'\)\) uses mesh "
                                                  r"axis 'a' twice"):
    rules.replace(rules=[("mlp", ("a", "a"))])


def test_axis_rules_hash_is_cached_and_value_based():
  a = AxisRules([("embed", "fsdp"), ("mlp", ("tensor", "fsdp"))])
  b = AxisRules([["embed", "fsdp"], ["mlp", ["tensor", "fsdp"]]])
  assert a == b and hash(a) == hash(b) == a._hash
  assert {a: 1}[b] == 1


def test_axis_rules_pickle_and_copy():
  rules = AxisRules.load("fsdp").replace(allow_unknown=True)
  for clone in (pickle.loads(pickle.dumps(rules)), copy.copy(rules), copy.deepcopy(rules)):
    assert clone == rules and clone.name == "fsdp" and clone.allow_unknown


def test_mesh_config_rejects_attribute_assignment():
  config = MeshConfig(fsdp=4, tensor=2)
  for attr in ("ici", "dcn", "_ici", "other"):
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"MeshConfig is immutable"):
      setattr(config, attr, (1,) * 6)
  with pytest.raises(dataclasses.FrozenInstanceError, match=r"cannot delete 'ici'"):
    del config.ici
  assert config.mesh_shape(8)["fsdp"] == 4


def test_mesh_config_replace_revalidates():
  config = MeshConfig(fsdp=-1, tensor=2)
  assert config.replace(tensor=4).mesh_shape(8) == MeshConfig(fsdp=2, tensor=4).mesh_shape(8)
  assert config.replace(ici={"data": 8}) == MeshConfig(data=8)
  assert config.replace(dcn={"data": 2}).dcn[0] == 2
  assert config.ici == MeshConfig(fsdp=-1, tensor=2).ici  # unchanged
  with pytest.raises(errors.MeshError, match=r"MeshConfig ici: invalid degree tensor=0"):
    config.replace(tensor=0)
  with pytest.raises(errors.MeshError, match=r"'fsdp' and 'data' are both -1"):
    config.replace(data=-1)
  with pytest.raises(errors.MeshError, match=r"MeshConfig.replace: give either ici=\{...\} or "
                                             r"degrees as keywords \(tensor\), not both"):
    config.replace(ici={"data": 8}, tensor=2)


def test_mesh_config_hash_pickle_and_copy():
  config = MeshConfig(ici=dict(fsdp=-1, tensor=2), dcn=dict(data=2))
  assert hash(config) == hash(MeshConfig.from_dict(config.to_dict())) == config._hash
  for clone in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
    assert clone == config
