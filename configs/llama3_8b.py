"""llama3_8b: Llama 3 8B's shapes (for multi-host accelerators and for the planner).

  python -m launch.train --config=configs/llama3_8b.py --workdir=/ckpt/llama3_8b
"""

from spmdnnx import train


def get_config():
  cfg = train.base_config()
  cfg.model = train.model_config("llama3_8b")
  cfg.steps = 100_000
  cfg.batch_size = 512
  cfg.seq_len = 8192
  cfg.microbatches = 4
  cfg.learning_rate = 3e-4
  cfg.warmup_steps = 2_000
  cfg.mesh = "fsdp=-1,tensor=4"
  cfg.rules = "fsdp_tp"
  cfg.log_every = 10
  cfg.eval_every = 2_000
  cfg.eval_batches = 8
  cfg.checkpoint_every = 500
  return cfg
