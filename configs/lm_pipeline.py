"""lm_tiny as a 4-stage pipeline (stage=4 x fsdp=2, 8 microbatches) on 8 devices.

  python -m launch.train --config=configs/lm_pipeline.py --workdir=/tmp/lm_pipe \
      --fake_devices=8 [--config.pipeline_repeats=1 ...]

The 4 layers split one per stage; with ``pipeline_repeats=2`` use
``--config.model.num_layers=8``. See docs/pipeline.md.
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("lm_tiny")
  cfg.steps = 300
  cfg.batch_size = 32
  cfg.seq_len = 128
  cfg.learning_rate = 3e-3
  cfg.warmup_steps = 20
  cfg.mesh = "stage=4,fsdp=2"
  cfg.rules = "fsdp_tp"
  cfg.pipeline_microbatches = 8
  cfg.pipeline_repeats = 1
  cfg.log_every = 10
  cfg.eval_every = 100
  cfg.checkpoint_every = 100
  return cfg
