"""CheckpointManager: save/restore round trips, items, intervals, retention."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spmdnnx as nnx
from ckpt_helpers import assert_same_values, host_values, make_model, make_optimizer


class Counter:
  """A data iterator whose state is a dict (as a grain DatasetIterator's)."""

  def __init__(self, i=0):
    self.i = i

  def get_state(self):
    return {"i": self.i, "epoch": 2}

  def set_state(self, state):
    self.i = state["i"]


class WithRngs(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)


def test_round_trip_of_every_item(tmp_path):
  model = make_model()
  optimizer = make_optimizer(model)
  x = jnp.ones((2, 4))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  optimizer.update(model, grads)
  data = Counter(17)
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    assert mngr.save(5, model=model, optimizer=optimizer, data=data,
                     metadata={"lr": 0.01, "layers": [1, 2]})
    data.i = 99  # the state was captured when save was called
  new_opt = nnx.eval_shape(lambda: make_optimizer(make_model(seed=1)))
  new_data = Counter()
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    info = mngr.restore(model=new_opt.model, optimizer=new_opt, data=new_data)
  assert info.step == 5
  assert info.metadata == {"lr": 0.01, "layers": [1, 2]}
  assert info.data_state == {"i": 17, "epoch": 2} and new_data.i == 17
  assert int(new_opt.step.value) == 1
  assert_same_values(host_values(new_opt.model), host_values(model))
  assert_same_values(host_values(new_opt), host_values(optimizer))
  # The restored optimizer keeps training from where the saved one was.
  new_opt.update(new_opt.model, grads)
  optimizer.update(model, grads)
  assert_same_values(host_values(new_opt), host_values(optimizer))


def test_rngs_and_batch_stats_are_restored(tmp_path):
  model = WithRngs(nnx.Rngs(0, dropout=1))
  model.drop.rngs()  # advance the stream
  model.bn.mean.value = jnp.arange(3.0)
  nnx.checkpointing.save(tmp_path / "c", model)
  other = WithRngs(nnx.Rngs(5, dropout=6))
  nnx.checkpointing.restore(tmp_path / "c", other)
  assert_same_values(host_values(other), host_values(model))
  key = other.drop.rngs.key.value
  assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  # Same key and count: the next dropout keys agree.
  assert (jax.random.key_data(other.drop.rngs())
          == jax.random.key_data(model.drop.rngs())).all()


def test_params_only_restore_with_a_fresh_optimizer(tmp_path):
  model = make_model()
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, model=model, optimizer=make_optimizer(model))
  fresh = make_model(seed=3)
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    info = mngr.restore(model=fresh)
  assert info.step == 1
  assert_same_values(host_values(fresh), host_values(model))
  opt = make_optimizer(fresh)
  assert int(opt.step.value) == 0


def test_save_interval_force_and_retention(tmp_path):
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with nnx.checkpointing.CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2,
                                           keep_period=4, async_save=False) as mngr:
    saved = [mngr.save(s, model=model) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert mngr.save(7, model=model, force=True)
    assert mngr.all_steps() == [4, 6, 7]  # 2 dropped; 4 kept by keep_period
    assert mngr.latest_step() == 7


@pytest.mark.parametrize("kwargs", [{}, {"snapshot": "host"}, {"async_save": False}])
def test_restore_a_given_step_and_the_latest(tmp_path, kwargs):
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with nnx.checkpointing.CheckpointManager(tmp_path, **kwargs) as mngr:
    for s in (1, 2):
      model.bias.value = jnp.full((2,), float(s))
      mngr.save(s, model=model)
    target = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
    assert mngr.restore(1, model=target).step == 1
    assert target.bias.value.tolist() == [1.0, 1.0]
    assert mngr.restore(model=target).step == 2
    assert target.bias.value.tolist() == [2.0, 2.0]


def test_restore_into_a_state(tmp_path):
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  nnx.checkpointing.save(tmp_path / "c", model)
  state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(1)))
  nnx.checkpointing.restore(tmp_path / "c", state)
  np.testing.assert_array_equal(state["kernel"].value, model.kernel.value)


@pytest.mark.parametrize("snapshot", ["device", "host"])
def test_async_save_survives_donation_of_the_saved_buffers(tmp_path, snapshot):
  model = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
  expected = np.asarray(model.kernel.value)
  with nnx.checkpointing.CheckpointManager(tmp_path, snapshot=snapshot) as mngr:
    mngr.save(1, model=model)
    model.kernel.value.delete()  # what a donating jit step does to the old buffer
    model.kernel.value = jnp.zeros((64, 64))
  target = nnx.eval_shape(lambda: nnx.Linear(64, 64, rngs=nnx.Rngs(1)))
  nnx.checkpointing.restore(tmp_path, target)
  np.testing.assert_array_equal(target.kernel.value, expected)


def test_metadata_config_dict_and_record(tmp_path):
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"model": {"embed": 8}, "lr": 0.1})
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    mngr.save(3, model=nnx.Linear(2, 2, rngs=nnx.Rngs(0)), metadata=cfg)
    info = mngr.restore(3, model=nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  assert info.metadata == {"model": {"embed": 8}, "lr": 0.1}
  assert info.record["versions"]["jax"] == jax.__version__
  assert [e["path"] for e in info.record["items"]["model"]] == [["bias"], ["kernel"]]


def test_record_names_mesh_axes_and_types(tmp_path):
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(make_model)
  nnx.checkpointing.save(tmp_path / "c", model)
  with open(tmp_path / "c" / "0" / "spmdnnx" / "metadata") as f:
    record = json.load(f)
  assert record["mesh"]["shape"]["fsdp"] == 4 and record["mesh"]["shape"]["tensor"] == 2
  assert record["mesh"]["axis_names"] == list(mesh.axis_names)
  assert set(record["mesh"]["axis_types"]) == {"Auto"}


def test_describe_shows_paths_shapes_axes_stack_and_mesh(tmp_path):
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.Stack(
          lambda r: nnx.Linear(8, 8, kernel_axes=("embed", "mlp"), rngs=r), 3, rngs=rngs)

  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=8))
  with nnx.use_sharding(mesh, "fsdp"):
    model = nnx.sharded_init(lambda: Net(nnx.Rngs(0)))
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, model=model, metadata={"a": 1})
    mngr.save(2, model=model)
  text = nnx.checkpointing.describe(tmp_path)
  assert "steps: 1, 2" in text and "  step: 2" in text
  assert "layers/block/kernel: Param float32[3, 8, 8] axes=('layers', 'embed', 'mlp')" in text
  assert "stack: layers: 3 layers stacked on axis 'layers'" in text
  assert "fsdp=8" in text and f"jax {jax.__version__}" in text
  one = nnx.checkpointing.describe(tmp_path / "1")
  assert "  step: 1" in one and "metadata: saved" in one


def test_optimizer_over_a_module_without_optimizer_class(tmp_path):
  # Any graph object is an item: here a plain Module used as "optimizer" state.
  holder = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, optimizer=holder)
    target = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
    mngr.restore(optimizer=target)
  np.testing.assert_array_equal(target.kernel.value, holder.kernel.value)


def test_optax_chain_state_round_trips(tmp_path):
  model = make_model()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt = nnx.Optimizer(model, tx)
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, model=model, optimizer=opt)
    target = nnx.eval_shape(lambda: nnx.Optimizer(make_model(1), tx))
    mngr.restore(model=target.model, optimizer=target)
  assert_same_values(host_values(target), host_values(opt))


class WithStreams(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 3, rngs=rngs)
    self.rngs = rngs


def test_abstract_target_with_rng_keys_of_several_implementations(tmp_path):
  model = WithStreams(nnx.Rngs(0, noise=jax.random.key(3, impl="rbg")))
  model.rngs.noise()
  nnx.checkpointing.save(tmp_path / "c", model)
  target = nnx.eval_shape(lambda: WithStreams(nnx.Rngs(1, noise=jax.random.key(4, impl="rbg"))))
  nnx.checkpointing.restore(tmp_path / "c", target)
  assert_same_values(host_values(target), host_values(model))
  assert jax.random.key_impl(target.rngs.noise.key.value) == jax.random.key_impl(
      model.rngs.noise.key.value)
  assert int(target.rngs.noise.count.value) == 1
  assert "rngs/noise/key: RngKey key<rbg>[]" in nnx.checkpointing.describe(tmp_path / "c")


def test_abstract_rng_keys_under_use_sharding(tmp_path):
  model = WithStreams(nnx.Rngs(0))
  nnx.checkpointing.save(tmp_path / "c", model)
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=8))
  with nnx.use_sharding(mesh, "fsdp"):
    target = nnx.eval_shape(lambda: WithStreams(nnx.Rngs(1)))
    nnx.checkpointing.restore(tmp_path / "c", target)
  assert_same_values(host_values(target), host_values(model))
  key = target.rngs.default.key.value
  assert key.sharding.mesh == mesh and key.sharding.spec == jax.sharding.PartitionSpec()
