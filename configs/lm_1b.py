"""lm_1b: a 1B-parameter Llama-style byte LM (a host of 8 accelerators or more).

  python -m launch.train --config=configs/lm_1b.py --workdir=/ckpt/lm_1b
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("lm_1b", vocab_size=256)  # byte-level data
  cfg.steps = 50_000
  cfg.batch_size = 512
  cfg.seq_len = 2048
  cfg.microbatches = 2
  cfg.learning_rate = 3e-4
  cfg.warmup_steps = 2_000
  cfg.mesh = "fsdp=-1,tensor=2"
  cfg.rules = "fsdp_tp"
  cfg.log_every = 50
  cfg.eval_every = 2_000
  cfg.eval_batches = 16
  cfg.checkpoint_every = 1_000
  return cfg
