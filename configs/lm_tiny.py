"""lm_tiny: a small Llama-style byte LM that trains on CPU in minutes.

  python -m launch.train --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny \
      --fake_devices=8 [--config.steps=100 ...]
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("lm_tiny")
  cfg.steps = 300
  cfg.batch_size = 16
  cfg.seq_len = 128
  cfg.learning_rate = 3e-3
  cfg.warmup_steps = 20
  cfg.mesh = "fsdp=-1,tensor=2"
  cfg.rules = "fsdp_tp"
  cfg.log_every = 10
  cfg.eval_every = 100
  cfg.checkpoint_every = 100
  return cfg
