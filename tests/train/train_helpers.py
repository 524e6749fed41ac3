"""Shared tiny configs for the runtime tests."""

import os
import sysconfig

from spmdnnx import train

STDLIB = sysconfig.get_paths()["stdlib"]
#: A small corpus (the stdlib's email package, ~380 KB) for fast tests.
SMALL_CORPUS = os.path.join(STDLIB, "email", "**", "*.py")


def tiny_config(**changes):
  """lm_tiny shrunk for tests: a few steps on a small corpus."""
  cfg = train.base_config()
  cfg.model = train.model_config("lm_tiny")
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
