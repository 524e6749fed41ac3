"""Resharding: written on one mesh, restored on others, bit-identical, same losses."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import spmdnnx as nnx
from ckpt_helpers import (assert_same_values, auto_mesh, host_values, make_model,
                          make_optimizer, train_steps)

RULES = "fsdp_tp"
SAVE_AT, MORE = 3, 3


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory):
  """Trains on fsdp=8, saves at step 3, trains 3 more steps (the run that never stopped)."""
  directory = tmp_path_factory.mktemp("reshard")
  with nnx.use_sharding(auto_mesh(fsdp=8), RULES):
    model = nnx.sharded_init(make_model)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 0, SAVE_AT)
    with nnx.checkpointing.CheckpointManager(directory) as mngr:
      assert mngr.save(SAVE_AT, model=model, optimizer=optimizer)
      saved_model, saved_opt = host_values(model), host_values(optimizer)
      # Training goes on (donating the buffers) while the save runs.
      losses = train_steps(model, optimizer, SAVE_AT, MORE)
  return directory, saved_model, saved_opt, losses


def _abstract_state():
  optimizer = nnx.eval_shape(lambda: make_optimizer(make_model()))
  return optimizer.model, optimizer


@pytest.mark.parametrize("degrees,n_devices", [
    ({"fsdp": 4, "tensor": 2}, 8),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
    ({"fsdp": 2, "tensor": 2}, 4),
    ({"fsdp": 8}, 8),
])
def test_restore_on_another_mesh_is_bit_identical_and_training_continues(
    fsdp8_run, degrees, n_devices):
  directory, saved_model, saved_opt, losses = fsdp8_run
  mesh = nnx.make_mesh(nnx.MeshConfig(**degrees), jax.devices()[:n_devices])
  with nnx.use_sharding(mesh, RULES):
    model, optimizer = _abstract_state()
    with nnx.checkpointing.CheckpointManager(directory) as mngr:
      info = mngr.restore(model=model, optimizer=optimizer)
    assert info.step == SAVE_AT
    assert_same_values(host_values(model), saved_model)
    assert_same_values(host_values(optimizer), saved_opt)
    assert int(optimizer.step.value) == SAVE_AT
    # Each array was read into the sharding the new mesh's rules give it.
    kernel = model.blocks[0].up.kernel.value
    expected = nnx.get_named_sharding(nnx.state(model))["blocks"][0]["up"]["kernel"].value
    assert kernel.sharding == expected
    assert kernel.sharding.mesh.devices.size == n_devices
    mu = optimizer.opt_state[0]["mu"]["blocks"][0]["up"]["kernel"].value
    assert mu.sharding.spec == expected.spec
    resumed = train_steps(model, optimizer, SAVE_AT, MORE)
  if degrees == {"fsdp": 8}:
    assert resumed == losses  # same mesh: the very same programs
  else:
    # Another mesh reduces in another order: equal up to float rounding.
    np.testing.assert_allclose(resumed, losses, rtol=1e-5, atol=0)


def test_restore_into_real_objects_keeps_their_shardings(fsdp8_run):
  directory, saved_model, _, _ = fsdp8_run
  mesh = auto_mesh(fsdp=4, tensor=2)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(lambda: make_model(seed=5))
  before = {p: v.value.sharding for p, v in nnx.state(model).flat_state()}
  # No context active now: the target's own shardings decide.
  with nnx.checkpointing.CheckpointManager(directory) as mngr:
    mngr.restore(model=model)
  assert_same_values(host_values(model), saved_model)
  assert {p: v.value.sharding for p, v in nnx.state(model).flat_state()} == before


def test_restore_under_jax_set_mesh(fsdp8_run):
  directory, saved_model, _, _ = fsdp8_run
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  model = nnx.eval_shape(make_model)
  with jax.set_mesh(mesh):
    with nnx.checkpointing.CheckpointManager(directory) as mngr:
      mngr.restore(model=model)
  assert_same_values(host_values(model), saved_model)
  # No rules: replicated on the mesh that jax.set_mesh made current.
  for _, leaf in nnx.state(model).flat_state():
    assert leaf.value.sharding == NamedSharding(mesh, P())


def test_abstract_restore_without_any_mesh_lands_on_one_device(fsdp8_run):
  directory, saved_model, _, _ = fsdp8_run
  model = nnx.eval_shape(make_model)
  with nnx.checkpointing.CheckpointManager(directory) as mngr:
    mngr.restore(model=model)
  assert_same_values(host_values(model), saved_model)
  assert model.head.kernel.value.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
