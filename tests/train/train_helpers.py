"""Shared tiny configs for the runtime tests."""

import os
import sysconfig

from spmdnnx import train

STDLIB = sysconfig.get_paths()["stdlib"]
#: A small corpus (the stdlib's email package, ~380 KB) for fast tests.
SMALL_CORPUS = os.path.join(STDLIB, "email", "**", "*.py")


def tiny_config(**changes):
  """lm_tiny shrunk for tests: a smaller model, a few steps, a small corpus.

  ``changes`` set fields by dotted name (``**{"data.path": ...}``).
  """
  cfg = train.base_config()
  cfg.model = train.model_config("lm_tiny", embed_dim=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64)
  cfg.steps = 6
  cfg.batch_size = 8
  cfg.seq_len = 32
  cfg.warmup_steps = 2
  cfg.log_every = 2
  cfg.eval_every = 0
  cfg.eval_batches = 2
  cfg.checkpoint_every = 0
  cfg.data.path = SMALL_CORPUS
  cfg.data.eval_fraction = 0.2
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg
