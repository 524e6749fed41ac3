"""The run config's pipeline fields: validation and what reaches the model."""

import numpy as np
import pytest

from spmdnnx import errors
from spmdnnx import train

from train_helpers import tiny_config


def pipeline_config(**changes):
  cfg = train.base_config()
  cfg.mesh = "stage=4,fsdp=2"
  cfg.pipeline_microbatches = 8
  for k, v in changes.items():
    setattr(cfg, k, v)
  return cfg


def test_defaults_mean_no_pipeline():
  cfg = train.base_config()
  assert (cfg.pipeline_microbatches, cfg.pipeline_repeats) == (0, 1)
  plan = train.validate(cfg, num_devices=8)
  assert plan.model.pipeline_microbatches == 0
  assert plan.rules.lookup("layers")[0] is None


def test_pipeline_fields_reach_the_model_and_rules():
  plan = train.validate(pipeline_config(pipeline_repeats=1), num_devices=8)
  assert (plan.model.pipeline_microbatches, plan.model.pipeline_repeats) == (8, 1)
  assert plan.rules.lookup("layers")[0] == "stage"
  assert plan.mesh_shape["stage"] == 4


def test_pipeline_without_stage_axis_keeps_rules():
  plan = train.validate(pipeline_config(mesh="fsdp=-1,tensor=2"), num_devices=8)
  assert plan.model.pipeline_microbatches == 8
  assert plan.rules.lookup("layers")[0] is None


def test_error_layers_not_divisible_by_stages_times_repeats():
  cfg = pipeline_config(pipeline_repeats=2)
  cfg.model.num_layers = 5
  with pytest.raises(errors.ConfigError, match=r"pipeline_repeats \(2\) must divide "
                     r"num_layers \(5\)"):
    train.validate(cfg, num_devices=8)
  cfg.model.num_layers = 4
  with pytest.raises(errors.ConfigError, match=r"model.num_layers=4 is not divisible by "
                     r"stages=4 x pipeline_repeats=2 = 8"):
    train.validate(cfg, num_devices=8)


def test_error_fewer_microbatches_than_stages():
  with pytest.raises(errors.ConfigError, match=r"pipeline_microbatches=2 is fewer than "
                     r"stages=4"):
    train.validate(pipeline_config(pipeline_microbatches=2), num_devices=8)


def test_error_batch_not_divisible_by_microbatches():
  with pytest.raises(errors.ConfigError, match=r"16 sequences per update step is not "
                     r"divisible by pipeline_microbatches=5"):
    train.validate(pipeline_config(pipeline_microbatches=5), num_devices=8)
  with pytest.raises(errors.ConfigError, match=r"8 sequences / pipeline_microbatches=8 = 1 "
                     r"per pipeline microbatch is not divisible by the 2 ways"):
    train.validate(pipeline_config(batch_size=16, microbatches=2), num_devices=8)


def test_error_bad_values_and_conflicts():
  with pytest.raises(errors.ConfigError, match=r"pipeline_microbatches=-1 \(must be an "
                     r"integer >= 0\)"):
    train.validate(pipeline_config(pipeline_microbatches=-1), num_devices=8)
  with pytest.raises(errors.ConfigError, match=r"pipeline_repeats=0 \(must be an integer > 0\)"):
    train.validate(pipeline_config(pipeline_repeats=0), num_devices=8)
  cfg = pipeline_config()
  cfg.model.pipeline_microbatches = 4
  with pytest.raises(errors.ConfigError, match=r"model.pipeline_microbatches=4 differs from "
                     r"pipeline_microbatches=8; set it once"):
    train.validate(cfg, num_devices=8)


@pytest.mark.slow
def test_pipelined_training_run_matches_fsdp(tmp_path):
  """The runtime end to end: stage=4 x fsdp=2 with 4 microbatches, vs plain FSDP."""
  losses = {}
  for name, changes in (("fsdp", dict(mesh="fsdp=8")),
                        ("pipeline", dict(mesh="stage=4,fsdp=2", pipeline_microbatches=4))):
    cfg = tiny_config(steps=3, rules="fsdp_tp", **changes, **{"model.num_layers": 4})
    result = train.run(cfg, workdir=str(tmp_path / name), log=lambda s: None)
    losses[name] = [result.losses[s] for s in sorted(result.losses)]
  assert len(losses["pipeline"]) == 3
  np.testing.assert_allclose(losses["pipeline"], losses["fsdp"], rtol=1e-4)


def test_shipped_pipeline_config_validates():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_pipeline.py")
  spec = importlib.util.spec_from_file_location("lm_pipeline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  plan = train.validate(module.get_config(), num_devices=8)
  assert plan.mesh_shape["stage"] == 4 and plan.model.pipeline_microbatches == 8
