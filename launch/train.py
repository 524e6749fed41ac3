"""Train a language model from an ml-collections config.

  python -m launch.train --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny \
      --fake_devices=8 --config.steps=200 --config.mesh=data=2,fsdp=2,tensor=2

A work directory that already holds checkpoints resumes from the latest one.
All logic lives in `spmdnnx.train`; this program only parses flags.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spmdnnx import errors
from spmdnnx import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py); override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config.json, metrics.jsonl, TensorBoard events, "
    "checkpoints/ (resumed from when present).")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_devices", 0, "Run on this many fake CPU devices (no accelerator needed); 0 uses "
    "the real devices.")
flags.mark_flags_as_required(["config", "workdir"])
train.define_distributed_flags()


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    if _FAKE_DEVICES.value:
      train.use_fake_devices(_FAKE_DEVICES.value)
    info = train.initialize_from_flags(flags.FLAGS)
    with train.process_log(_WORKDIR.value, process_index=info.process_index), \
        train.FaultHooks(_WORKDIR.value, process_index=info.process_index,
                         hang_timeout=flags.FLAGS.hang_timeout) as faults:
      hooks = train.Hooks(on_step_end=[faults.on_step_end], should_stop=[faults.should_stop])
      result = train.run(_CONFIG.value, workdir=_WORKDIR.value, hooks=hooks)
  except errors.SpmdnnxError as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  if result.eval is not None:
    print(f"done: step {result.final_step}, eval loss {result.eval['eval_loss']:.4f}, "
          f"{result.eval['eval_bits_per_byte']:.3f} bits/byte; work directory "
          f"{_WORKDIR.value}")
  return 0


if __name__ == "__main__":
  app.run(main)
