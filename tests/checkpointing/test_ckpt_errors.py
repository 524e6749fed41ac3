"""Every error path of spmdnnx.checkpointing, matched by message."""

import gc
import os

import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from ckpt_helpers import make_model

CheckpointError = nnx.errors.CheckpointError

# A read that fails inside orbax leaves its asyncio tasks behind; when they are
# garbage-collected after orbax closed their event loop, Python reports
# "Event loop is closed" as an unraisable exception (orbax 0.12.8 noise, not a
# failure of ours). Tests of corrupted reads collect them before they end and
# ignore that report.
orbax_read_noise = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _linear(seed=0, n=2):
  return nnx.Linear(n, n, rngs=nnx.Rngs(seed))


@pytest.fixture
def two_steps(tmp_path):
  model = _linear()
  with nnx.checkpointing.CheckpointManager(tmp_path / "c") as mngr:
    model.bias.value = jnp.full((2,), 1.0)
    mngr.save(1, model=model)
    model.bias.value = jnp.full((2,), 2.0)
    mngr.save(2, model=model)
  return tmp_path / "c"


@pytest.mark.parametrize("kwargs,match", [
    ({"save_interval_steps": 0}, "save_interval_steps must be a positive int, got 0"),
    ({"max_to_keep": -1}, "max_to_keep must be a positive int or None"),
    ({"keep_period": 1.5}, "keep_period must be a positive int or None, got 1.5"),
])
def test_bad_manager_options(tmp_path, kwargs, match):
  with pytest.raises(nnx.errors.ConfigError, match=match):
    nnx.checkpointing.CheckpointManager(tmp_path, **kwargs)


def test_bad_snapshot(tmp_path):
  with pytest.raises(nnx.errors.ConfigError,
                     match=r"snapshot must be one of \('device', 'host'\), got 'disk'"):
    nnx.checkpointing.CheckpointManager(tmp_path, snapshot="disk")


def test_bad_saves(tmp_path):
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    with pytest.raises(CheckpointError, match="nothing to save; pass model="):
      mngr.save(1)
    with pytest.raises(CheckpointError, match="step must be a non-negative int, got -1"):
      mngr.save(-1, model=_linear())
    with pytest.raises(CheckpointError, match="metadata= must be JSON-serializable"):
      mngr.save(1, metadata={"f": object()})
    with pytest.raises(CheckpointError, match=r"data= must have get_state\(\) and set_state"):
      mngr.save(1, data=[1, 2])
    with pytest.raises(CheckpointError, match=r"expected a Module, an Optimizer or a State"):
      mngr.save(1, model=np.zeros(3))
    abstract = nnx.eval_shape(_linear)
    with pytest.raises(CheckpointError, match=r"cannot save abstract values .* at bias, kernel"):
      mngr.save(1, model=abstract)
    mngr.save(1, model=_linear())
    with pytest.raises(CheckpointError, match=r"step 1 already exists in .*never overwritten"):
      mngr.save(1, model=_linear())
  with pytest.raises(CheckpointError, match="the manager for .* is closed"):
    mngr.save(2, model=_linear())


def test_data_state_must_be_json(tmp_path):

  class BytesState:

    def get_state(self):
      return b"x"

    def set_state(self, s):
      pass

  class Weird(BytesState):

    def get_state(self):
      return {"a": {1, 2}}

  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    with pytest.raises(CheckpointError, match=r"returned bytes .*DatasetIterator"):
      mngr.save(1, data=BytesState())
    with pytest.raises(CheckpointError, match="data.get_state\\(\\) is not JSON-serializable"):
      mngr.save(1, data=Weird())


def test_missing_and_empty_directory(tmp_path):
  missing = tmp_path / "nope"
  with nnx.checkpointing.CheckpointManager(missing) as mngr:
    with pytest.raises(CheckpointError, match=f"{missing} did not exist .*check the path"):
      mngr.restore(model=_linear())
  with nnx.checkpointing.CheckpointManager(missing) as mngr:
    with pytest.raises(CheckpointError, match=f"{missing} contains no complete checkpoint"):
      mngr.restore(model=_linear())
  with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'other'}"):
    nnx.checkpointing.restore(tmp_path / "other", _linear())
  with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'other'}"):
    nnx.checkpointing.describe(tmp_path / "other")
  with pytest.raises(CheckpointError, match=f"{missing} holds no complete checkpoint step"):
    nnx.checkpointing.describe(missing)


def test_missing_step_item_and_data(two_steps):
  with nnx.checkpointing.CheckpointManager(two_steps) as mngr:
    with pytest.raises(CheckpointError, match=r"step 7 does not exist in .*available steps: 1, 2"):
      mngr.restore(7, model=_linear())
    with pytest.raises(CheckpointError, match=r"step 2 at .*/2 has no optimizer \(it holds "
                                              r"model\); omit optimizer="):
      mngr.restore(optimizer=_linear())
    with pytest.raises(CheckpointError, match="has no data-iterator state; omit data="):
      mngr.restore(model=_linear(), data=_Iter())


class _Iter:

  def get_state(self):
    return {}

  def set_state(self, s):
    pass


def _data_files(step_dir):
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, "model")):
    out += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in root + os.sep]
  return out


def _truncate_arrays(step_dir):
  files = _data_files(step_dir)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(max(0, os.path.getsize(f) // 3))


@orbax_read_noise
def test_truncated_latest_step_is_reported_and_fallback_is_opt_in(two_steps):
  _truncate_arrays(two_steps / "2")
  target = _linear(5)
  before = np.asarray(target.bias.value)
  with nnx.checkpointing.CheckpointManager(two_steps) as mngr:
    with pytest.raises(CheckpointError, match=r"step 2 at .*/2 is corrupted or incomplete .*"
                                              r"fallback_to_previous=True"):
      mngr.restore(model=target)
    np.testing.assert_array_equal(target.bias.value, before)  # untouched on failure
    with pytest.raises(CheckpointError, match=r"step 2 at .*/2 is corrupted or incomplete"):
      mngr.restore(2, model=target, fallback_to_previous=True)  # an explicit step: no fallback
    with pytest.warns(nnx.checkpointing.CheckpointWarning,
                      match=r"restored step 1 instead of the latest: skipped .*step 2"):
      info = mngr.restore(model=target, fallback_to_previous=True)
  assert info.step == 1 and target.bias.value.tolist() == [1.0, 1.0]
  gc.collect()


@orbax_read_noise
def test_garbage_bytes_are_reported(two_steps):
  for f in _data_files(two_steps / "2"):
    size = os.path.getsize(f)
    with open(f, "wb") as fh:
      fh.write(b"\x17" * size)
  with nnx.checkpointing.CheckpointManager(two_steps) as mngr:
    with pytest.raises(CheckpointError, match=r"step 2 at .*/2 is corrupted or incomplete"):
      mngr.restore(model=_linear())
  gc.collect()


def test_missing_or_broken_record(two_steps):
  os.remove(two_steps / "2" / "spmdnnx" / "metadata")
  with open(two_steps / "1" / "spmdnnx" / "metadata", "w") as f:
    f.write("{not json")
  with nnx.checkpointing.CheckpointManager(two_steps) as mngr:
    with pytest.raises(CheckpointError, match=r"/2 has no spmdnnx record .*not a checkpoint "
                                              r"written by spmdnnx, or its save did not complete"):
      mngr.restore(model=_linear())
    with pytest.raises(CheckpointError, match=r"no readable step in .*record of .*/1 is "
                                              r"unreadable or corrupted"):
      mngr.restore(model=_linear(), fallback_to_previous=True)


def test_structure_mismatch_lists_every_path_with_both_sides(tmp_path):
  model = make_model()
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    mngr.save(4, model=model)

  class Changed(nnx.Module):

    def __init__(self, rngs):
      base = make_model()
      self.embed = nnx.Linear(4, 16, kernel_axes=(None, "embed"), rngs=rngs)  # shape
      self.blocks = base.blocks
      self.head = nnx.Linear(8, 2, kernel_axes=("mlp", None), rngs=rngs)  # axes
      self.extra = nnx.Linear(2, 2, rngs=rngs)  # not in the checkpoint

  target = nnx.eval_shape(lambda: Changed(nnx.Rngs(0)))
  del target.blocks[1]  # in the checkpoint, not in the target
  with nnx.checkpointing.CheckpointManager(tmp_path) as mngr:
    with pytest.raises(CheckpointError) as info:
      mngr.restore(model=target)
  msg = str(info.value)
  assert "does not match checkpoint step 4" in msg
  assert ("embed/kernel: checkpoint Param float32[4, 8] axes=(None, 'embed') vs target "
          "Param float32[4, 16] axes=(None, 'embed')") in msg
  assert ("head/kernel: checkpoint Param float32[8, 2] axes=('embed', None) vs target "
          "Param float32[8, 2] axes=('mlp', None)") in msg
  assert "in the target but not in the checkpoint: extra/bias" in msg
  assert "in the checkpoint but not in the target: blocks/1/down/bias" in msg
  assert msg.count("differ: ") == 1 and "3 differ" in msg
  assert info.value.step == 4
  assert "extra/kernel" in info.value.paths and "blocks/1/up/kernel" in info.value.paths


def test_dtype_change_is_a_mismatch(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", _linear())
  target = nnx.Linear(2, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  with pytest.raises(CheckpointError, match=r"kernel: checkpoint Param float32\[2, 2\].* vs "
                                            r"target Param bfloat16\[2, 2\]"):
    nnx.checkpointing.restore(tmp_path / "c", target)


def test_one_shot_save_never_overwrites(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", _linear())
  with pytest.raises(CheckpointError, match=r"already exists and is not empty"):
    nnx.checkpointing.save(tmp_path / "c", _linear())


def test_plain_orbax_metadata_unreadable(tmp_path):
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "_METADATA").write_text("garbage")
  with pytest.raises(CheckpointError, match=r"looks like an orbax checkpoint but its metadata "
                                            r"cannot be read"):
    nnx.checkpointing.restore(tmp_path / "p", _linear())


def test_long_mismatch_lists_are_capped(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", make_model())
  with pytest.raises(CheckpointError, match=r"13 differ: .*\(and 3 more\); 6 in the target "
                                            r"but not in the checkpoint"):
    nnx.checkpointing.restore(tmp_path / "c", nnx.eval_shape(lambda: make_model(embed=16,
                                                                                layers=3)))
