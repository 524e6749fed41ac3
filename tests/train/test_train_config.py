"""Run configs: every bad value gives one clear error before anything compiles."""

import pytest

from spmdnnx import errors
from spmdnnx import train

from train_helpers import tiny_config


def _validate(cfg, devices=8, processes=1):
  return train.validate(cfg, num_devices=devices, process_count=processes)


def test_valid_config_gives_a_plan():
  plan = _validate(tiny_config(mesh="fsdp=4,tensor=2"))
  assert plan.mesh_shape["fsdp"] == 4 and plan.mesh_shape["tensor"] == 2
  assert plan.batch_ways == 4  # batch -> (data, fsdp)
  assert plan.model.kind == "llama"


def test_every_shipped_config_loads_and_validates_on_its_mesh():
  import importlib.util, os  # noqa: E401 (test-local loader)
  root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
  devices = {"lm_tiny": 8, "mlp_quick": 8, "lm_125m": 8, "lm_1b": 64, "llama3_8b": 256,
             "llama3_70b": 1024}
  for name, n in devices.items():
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for field in ("steps", "batch_size", "seq_len", "microbatches", "learning_rate",
                  "warmup_steps", "mesh", "rules", "seed", "log_every", "eval_every",
                  "checkpoint_every", "max_to_keep"):
      assert field in cfg, (name, field)
    assert "path" in cfg.data
    _validate(cfg, devices=n)


def test_unknown_fields_are_listed_with_suggestions():
  cfg = tiny_config()
  cfg.unlock()
  cfg.stepz = 3
  cfg.data.paht = "x"
  with pytest.raises(errors.ConfigError, match=r"stepz \(did you mean 'steps'\?\)") as info:
    _validate(cfg)
  assert "data.paht (did you mean 'path'?)" in str(info.value)
  assert len(info.value.keys) == 2


def test_bad_values_are_all_listed():
  cfg = tiny_config(steps=0, learning_rate=-1.0, max_in_flight=0, profile_steps="5")
  with pytest.raises(errors.ConfigError, match="steps=0") as info:
    _validate(cfg)
  msg = str(info.value)
  assert "learning_rate=-1.0" in msg and "max_in_flight=0" in msg
  assert "profile_steps='5'" in msg


def test_bad_model_field_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="model:"):
    _validate(tiny_config(**{"model.num_kv_heads": 3}))


def test_mesh_not_dividing_the_devices():
  with pytest.raises(errors.MeshError, match="8 devices"):
    _validate(tiny_config(mesh="fsdp=3,tensor=2"))


def test_malformed_mesh_string():
  with pytest.raises(errors.ConfigError, match="must look like name=degree"):
    _validate(tiny_config(mesh="fsdp:4"))


def test_batch_not_divisible_by_the_batch_axes():
  with pytest.raises(errors.ConfigError,
                     match=r"batch_size=6 .* not divisible by the 4 ways of the batch axes"):
    _validate(tiny_config(batch_size=6, mesh="fsdp=4,tensor=2"))


def test_microbatch_not_divisible_by_the_batch_axes():
  with pytest.raises(errors.ConfigError, match="use a multiple of 16"):
    _validate(tiny_config(batch_size=8, microbatches=2, mesh="fsdp=8"))


def test_batch_not_divisible_by_microbatches():
  with pytest.raises(errors.ConfigError, match="not divisible by microbatches=3"):
    _validate(tiny_config(microbatches=3))


def test_seq_len_not_a_multiple_of_the_sequence_axis():
  cfg = tiny_config(seq_len=30, mesh="fsdp=2,sequence=4", rules="fsdp_tp_sp")
  with pytest.raises(errors.ConfigError, match=r"seq_len=30 .* 4 ways .*multiple of 4"):
    _validate(cfg)


def test_seq_len_longer_than_the_model():
  with pytest.raises(errors.ConfigError, match="exceeds model.max_seq_len"):
    _validate(tiny_config(seq_len=100_000))


def test_batch_not_divisible_by_processes():
  with pytest.raises(errors.ConfigError, match="not divisible by the 3 processes"):
    _validate(tiny_config(batch_size=8, mesh="fsdp=-1"), devices=24, processes=3)


def test_unknown_rules_preset():
  with pytest.raises(errors.AxisRulesError):
    _validate(tiny_config(rules="no_such_rules"))


def test_unknown_model_preset():
  with pytest.raises(errors.ConfigError, match="Unknown model preset 'nope'"):
    train.model_config("nope")


def test_config_json_roundtrip(tmp_path):
  cfg = tiny_config(steps=7)
  train.save_config(cfg, str(tmp_path))
  back = train.load_config(str(tmp_path))
  assert back.steps == 7 and back.model.to_dict() == cfg.model.to_dict()


def test_load_config_of_a_non_run_directory(tmp_path):
  with pytest.raises(errors.ConfigError, match="not the work directory of a training run"):
    train.load_config(str(tmp_path))


def test_run_rejects_bad_config_before_building_anything(tmp_path):
  with pytest.raises(errors.ConfigError, match="batch_size=6"):
    train.run(tiny_config(batch_size=6), workdir=str(tmp_path / "run"))
  with pytest.raises(errors.DataError, match="matches no file"):
    train.run(tiny_config(**{"data.path": str(tmp_path / "none" / "*.txt")}),
              workdir=str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written, nothing compiled
