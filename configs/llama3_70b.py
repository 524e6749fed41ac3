"""llama3_70b: Llama 3 70B's shapes (for large multi-host jobs and for the planner).

  python -m launch.train --config=configs/llama3_70b.py --workdir=/ckpt/llama3_70b
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("llama3_70b")
  cfg.steps = 100_000
  cfg.batch_size = 1024
  cfg.seq_len = 8192
  cfg.microbatches = 8
  cfg.learning_rate = 1.5e-4
  cfg.warmup_steps = 2_000
  cfg.mesh = "fsdp=-1,tensor=8"
  cfg.rules = "fsdp_tp"
  cfg.log_every = 10
  cfg.eval_every = 2_000
  cfg.eval_batches = 8
  cfg.checkpoint_every = 250
  return cfg
