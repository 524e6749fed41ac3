"""Tests for shard_batch and global_batch_from_local (single process)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from spmdnnx import errors
from spmdnnx.spmd._batch import global_batch_from_local, shard_batch
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._mesh import MeshConfig, make_mesh


@pytest.fixture
def mesh():
  return make_mesh(MeshConfig(data=2, fsdp=2, sequence=2))


def test_shard_batch_splits_leading_dim_over_batch_axes(mesh):
  batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8)}
  with use_sharding(mesh, "fsdp"):
    out = shard_batch(batch)
  assert out["x"].sharding.spec == P(("data", "fsdp"), None)
  assert out["x"].addressable_shards[0].data.shape == (2, 3)
  assert out["y"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])


def test_batch_and_length_axes(mesh):
  x = np.ones((4, 6, 5), np.float32)
  out = shard_batch(x, mesh, "fsdp_tp_sp", axes=("batch", "length"))
  assert out.sharding.spec == P(("data", "fsdp"), "sequence", None)
  assert out.addressable_shards[0].data.shape == (1, 3, 5)


def test_device_array_input_and_scalar_leaf(mesh):
  out = shard_batch((jnp.ones((4, 2)), np.float32(3.0)), mesh, "fsdp")
  assert out[0].sharding.spec == P(("data", "fsdp"), None)
  assert out[1].sharding.spec == P() and float(out[1]) == 3.0


def test_indivisible_batch_falls_back_then_warns(mesh):
  out = shard_batch({"x": np.ones((6, 2))}, mesh, "fsdp")
  assert out["x"].sharding.spec == P("data", None)  # fallback rule, no warning
  with pytest.warns(errors.ShardingWarning, match=r"batch/x dim 0 \('batch', size 3; tried "
                                                  r"\(data, fsdp\)=4, data=2\)"):
    out = shard_batch({"x": np.ones((3, 2))}, mesh, "fsdp")
  assert out["x"].sharding.spec == P(None, None)


def test_errors(mesh):
  with pytest.raises(errors.ShardingError, match=r"shard_batch needs mesh and rules"):
    shard_batch(np.ones(4))
  with pytest.raises(errors.AxisRulesError, match=r"No axis rule for logical name\(s\) "
                                                  r"\['examples'\]"):
    shard_batch(np.ones(4), mesh, "fsdp", axes=("examples",))


def test_global_batch_from_local_single_process(mesh):
  local = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
  with use_sharding(mesh, "fsdp"):
    out = global_batch_from_local(local)
    ref = shard_batch(local)
  assert out["x"].shape == (8, 2)
  assert out["x"].sharding == ref["x"].sharding
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
  assert jax.process_count() == 1
