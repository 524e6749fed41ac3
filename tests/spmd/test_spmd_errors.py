"""SPMD errors: each raise site's message, and the structured fields it carries."""

import types

import jax
import jax.numpy as jnp
import pytest

from spmdnnx import errors
from spmdnnx._state import State
from spmdnnx._variables import Param
from spmdnnx.spmd._context import mesh_and_rules
from spmdnnx.spmd._init import plan_init
from spmdnnx.spmd._mesh import MeshConfig, make_mesh
from spmdnnx.spmd._mesh_axes import axis_sizes
from spmdnnx.spmd._partition import get_partition_spec
from spmdnnx.spmd._report import sharding_report
from spmdnnx.spmd._resolve import resolve_all
from spmdnnx.spmd._rules import AxisRules

FT = {"data": 1, "fsdp": 4, "tensor": 2}


def _raise(cls, match, fn, *args, **kwargs):
  with pytest.raises(cls, match=match) as info:
    fn(*args, **kwargs)
  return info.value


def test_rules_construction_errors_carry_fields():
  e = _raise(errors.AxisRulesError, r"Expected a list of \(logical_name, mesh_axes\) pairs, "
             r"got int\.", AxisRules, 3, name="mine")
  assert e.rules == "mine"
  e = _raise(errors.AxisRulesError, r"got the string 'fsdp'", AxisRules, "fsdp")
  assert e.rules == "fsdp"
  e = _raise(errors.AxisRulesError, r"Invalid axis rules 'x': entry 0", AxisRules,
             [("a",), ("b", "c")], name="x")
  assert e.rules == "x" and len(e.entries) == 1 and e.entries[0].startswith("entry 0")


def test_validate_error_names_rules_axes_and_mesh():
  e = _raise(errors.AxisRulesError, r"\('embed' -> model\) names 'model'.*The mesh has axes "
             r"\('data', 'fsdp', 'tensor'\)", AxisRules([("embed", "model")], name="r").validate,
             FT)
  assert e.rules == "r" and e.axes == ["model"] and e.mesh == FT


def test_resolution_errors_carry_paths_axes_shapes():
  s = State({"w": Param(jnp.zeros((8, 4)), logical_axes=("embed", "hidden")),
             "b": Param(jnp.zeros((4,)), logical_axes=("hidden",))})
  e = _raise(errors.AxisRulesError, r"No axis rule for logical name\(s\) \['hidden'\]",
             get_partition_spec, s, rules=[("embed", "fsdp")], mesh=FT)
  assert e.axes == ["hidden"] and sorted(e.paths) == ["b", "w"]
  e = _raise(errors.AxisRulesError, r"name mesh axes \['model'\] that the mesh lacks "
             r"\(needed by w\)", AxisRules([("embed", "model")]).resolve, ("embed",), (8,),
             {"fsdp": 2}, path=("w",))
  assert e.axes == ["model"] and e.paths == ["w"]
  e = _raise(errors.MetadataError, r"w: logical_axes \('embed',\) has 1 entries but the array "
             r"has shape \(8, 4\)", AxisRules([("embed", "fsdp")]).resolve, ("embed",), (8, 4),
             FT, path=("w",))
  assert e.paths == ["w"] and e.shapes == [(8, 4)] and e.axes == [("embed",)]
  e = _raise(errors.MetadataError, r"logical_axes length differs from the array rank for: "
             r"p \(axes \('embed',\), shape \(2, 2\)\)", resolve_all, [("p",)], [("embed",)],
             [(2, 2)], [("embed", "fsdp")], FT)
  assert e.paths == ["p"] and e.shapes == [(2, 2)] and e.axes == [("embed",)]


def test_load_errors_carry_the_path(tmp_path):
  e = _raise(errors.AxisRulesError, r"No axis-rules file .*missing.json.*Shipped rule sets: dp",
             AxisRules.load, str(tmp_path / "missing.json"))
  assert e.path.endswith("missing.json")
  e = _raise(errors.AxisRulesError, r"No axis-rules file 'nope.json' among the presets",
             AxisRules.load, "nope")
  assert e.path == "nope"
  bad = tmp_path / "bad.json"
  bad.write_text("[")
  e = _raise(errors.AxisRulesError, r"is not valid JSON", AxisRules.load, bad)
  assert e.path == str(bad)
  bad.write_text("{}")
  e = _raise(errors.AxisRulesError, r"Axis-rules JSON 'bad' has no 'rules' key", AxisRules.load,
             bad)
  assert e.rules == "bad"


def test_mesh_config_errors_carry_fields():
  e = _raise(errors.MeshError, r"unknown parallelism axis 'model'", MeshConfig, model=2)
  assert e.axes == ["model"] and e.level == "ici"
  e = _raise(errors.MeshError, r"invalid degree fsdp=0", MeshConfig, fsdp=0)
  assert e.axes == ["fsdp"]
  e = _raise(errors.MeshError, r"'fsdp' and 'tensor' are both -1", MeshConfig, fsdp=-1,
             tensor=-1)
  assert e.axes == ["fsdp", "tensor"]
  e = _raise(errors.MeshError, r"degrees multiply to 16 \(fsdp=4 x tensor=4\) but there are 8 "
             r"devices", MeshConfig(fsdp=4, tensor=4).mesh_shape, 8)
  assert e.product == 16 and e.count == 8 and e.axes == ["fsdp", "tensor"]
  assert e.mesh["fsdp"] == 4
  e = _raise(errors.MeshError, r"the fixed degrees multiply to 3 \(tensor=3\), which does not "
             r"divide the 8 devices, so fsdp=-1", MeshConfig(fsdp=-1, tensor=3).mesh_shape, 8)
  assert e.axes == ["fsdp"] and e.product == 3
  e = _raise(errors.MeshError, r"8 devices cannot be split evenly into 3 slices",
             MeshConfig().resolve, 8, 3)
  assert e.count == 8 and e.slices == 3
  e = _raise(errors.MeshError, r"unexpected keys \['tensor'\] next to ici/dcn",
             MeshConfig.from_dict, {"ici": {}, "tensor": 2})
  assert e.axes == ["tensor"]


def test_make_mesh_errors():
  e = _raise(errors.MeshError, r"make_mesh expects a MeshConfig, got dict; build one with "
             r"MeshConfig", make_mesh, {"fsdp": 8})
  assert e.got == "dict"
  e = _raise(errors.MeshError, r"Unknown axis_types 'manual'", make_mesh, MeshConfig(fsdp=8),
             axis_types="manual")
  assert e.axis_types == "manual"
  e = _raise(errors.MeshError, r"axis_types must be 'auto', 'explicit', one AxisType or 6 of "
             r"them", make_mesh, MeshConfig(fsdp=8), axis_types=(jax.sharding.AxisType.Auto,))
  assert len(e.axes) == 6


def test_hybrid_mesh_needs_equal_slices():
  fake = [types.SimpleNamespace(process_index=p, platform="cpu", id=i)
          for i, p in enumerate([0, 0, 0, 1])]
  config = MeshConfig(ici=dict(fsdp=-1), dcn=dict(data=2))
  e = _raise(errors.MeshError, r"A hybrid mesh needs the same number of devices in every "
             r"slice; got \{0: 3, 1: 1\} devices per slice", make_mesh, config, devices=fake)
  assert e.slices == {0: 3, 1: 1}


def test_axis_sizes_errors():
  e = _raise(errors.MeshError, r"Expected a jax.sharding.Mesh, AbstractMesh or a dict of axis "
             r"sizes, got list", axis_sizes, [2, 4])
  assert e.got == "list"
  e = _raise(errors.MeshError, r"bad entries: 'fsdp'=0", axis_sizes, {"fsdp": 0, "tensor": 2})
  assert e.axes == ["fsdp"] and e.mesh == {"fsdp": 0, "tensor": 2}


def test_context_and_init_errors_carry_fields():
  e = _raise(errors.ShardingError, r"sharded_init needs mesh and rules", mesh_and_rules,
             what="sharded_init")
  assert e.missing == ["mesh", "rules"] and e.what == "sharded_init"
  e = _raise(errors.ShardingError, r"get_partition_spec needs rules", mesh_and_rules,
             need_mesh=False, what="get_partition_spec")
  assert e.missing == ["rules"]
  mesh = make_mesh(MeshConfig(fsdp=8))
  e = _raise(errors.ConfigError, r"chunk_fraction must be in \(0, 1\], got 2; pass e.g. 0.1",
             plan_init, lambda: State({}), mesh=mesh, rules="fsdp", chunk_fraction=2)
  assert e.value == 2


def test_strict_report_error_carries_paths():
  s = State({"w": Param(jnp.zeros((8, 4)), logical_axes=("norm", "norm"))})
  e = _raise(errors.ShardingError, r"100.0% of parameter bytes are fully replicated",
             sharding_report, s, FT, [("norm", None)], strict_replicated_fraction=0.5)
  assert e.paths == ["w"] and e.shapes == [(8, 4)] and e.axes == [("norm", "norm")]
