"""mlp_quick: a position-wise MLP byte model for smoke tests (seconds on CPU).

  python -m launch.train --config=configs/mlp_quick.py --workdir=/tmp/mlp_quick --fake_devices=8
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("mlp_quick")
  cfg.steps = 50
  cfg.batch_size = 16
  cfg.seq_len = 64
  cfg.learning_rate = 3e-3
  cfg.warmup_steps = 5
  cfg.mesh = "fsdp=-1"
  cfg.rules = "fsdp"
  cfg.log_every = 10
  cfg.eval_every = 25
  cfg.eval_batches = 2
  cfg.checkpoint_every = 25
  return cfg
