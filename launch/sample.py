"""Generate text from the latest checkpoint of a training run.

  python -m launch.sample --workdir=/tmp/lm_tiny --prompt="def " \
      --max_new_tokens=200 --temperature=0.8 --fake_devices=8

The model is rebuilt from the run's config.json and laid out on whatever
devices are available; only the parameters are read from the checkpoint.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

from spmdnnx import errors
from spmdnnx import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text the sample continues.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest bytes (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", 0,
                                     "Run on this many fake CPU devices; 0: real devices.")
flags.mark_flag_as_required("workdir")
train.define_distributed_flags()


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    if _FAKE_DEVICES.value:
      train.use_fake_devices(_FAKE_DEVICES.value)
    train.initialize_from_flags(flags.FLAGS)
    loaded = train.load_model(_WORKDIR.value)
    text = train.sample(loaded, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value or None,
                        seed=_SEED.value)
  except errors.SpmdnnxError as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  print(f"--- sample from step {loaded.step} of {_WORKDIR.value} ---")
  print(_PROMPT.value + text)
  return 0


if __name__ == "__main__":
  app.run(main)
