"""The public spmd names are the functions, never the implementation modules."""

import types

import spmdnnx as nnx
from spmdnnx import spmd


def test_top_level_spmd_names_are_the_functions():
  for name in ("constrain", "current_context", "use_sharding", "get_partition_spec",
               "get_named_sharding", "sharded_init", "sharding_report", "shard_batch",
               "global_batch_from_local", "make_mesh", "plan_abstract"):
    value = getattr(nnx, name)
    assert not isinstance(value, types.ModuleType), name
    assert value is getattr(spmd, name), name
  assert nnx.AxisRules is spmd.AxisRules and nnx.MeshConfig is spmd.MeshConfig


def test_spmd_namespace_exports_no_modules():
  public = [n for n in dir(spmd) if not n.startswith("_")]
  assert not [n for n in public if isinstance(getattr(spmd, n), types.ModuleType)]
