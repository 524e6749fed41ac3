"""lm_125m: a GPT-2-small-sized Llama-style byte LM (one accelerator host).

  python -m launch.train --config=configs/lm_125m.py --workdir=/ckpt/lm_125m
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("lm_125m", vocab_size=256)  # byte-level data
  cfg.steps = 20_000
  cfg.batch_size = 256
  cfg.seq_len = 1024
  cfg.learning_rate = 6e-4
  cfg.warmup_steps = 1_000
  cfg.mesh = "fsdp=-1"
  cfg.rules = "fsdp_tp"
  cfg.log_every = 50
  cfg.eval_every = 1_000
  cfg.eval_batches = 16
  cfg.checkpoint_every = 1_000
  return cfg
