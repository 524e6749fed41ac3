"""Size and rank the mesh layouts of a run config for N devices, on a laptop.

  python -m launch.plan --config=configs/llama3_70b.py --devices=512 \
      [--devices_per_host=8] [--device=h100] [--top=10] [--json=plan.json] \
      [--no_compile] [--microbatches=4,8] [--remat=full,save_dots]

By default the real train step of every layout is compiled for N fake CPU
devices in a subprocess (seconds per layout); --no_compile answers from the
analytic model at once. The columns are explained in docs/planning.md. All
logic lives in `spmdnnx.train.plan_layouts`; this program only parses flags.
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
_DEVICES = flags.DEFINE_integer("devices", None, "Devices of the planned job.")
_PER_HOST = flags.DEFINE_integer("devices_per_host", 8,
                                 "Devices per host (tensor parallelism stays within one).")
_DEVICE = flags.DEFINE_string("device", "h100", "Device kind: one of "
                              f"{', '.join(train.DEVICE_KINDS)}.")
_TOP = flags.DEFINE_integer("top", 10, "Rows of the table to print (0: all).")
_JSON = flags.DEFINE_string("json", None, "Write every layout's numbers to this JSON file.")
_NO_COMPILE = flags.DEFINE_bool("no_compile", False,
                                "Skip compiling; use the analytic collective estimate.")
_MICROBATCHES = flags.DEFINE_list("microbatches", [], "Microbatch counts to try "
                                  "(default: the config's).")
_REMAT = flags.DEFINE_list("remat", [], "Remat policies to try (default: the config's).")
flags.mark_flags_as_required(["config", "devices"])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    microbatches = [int(m) for m in _MICROBATCHES.value]
  except ValueError:
    print(f"error: --microbatches={','.join(_MICROBATCHES.value)}: give integers",
          file=sys.stderr)
    return 1
  try:
    plan = train.plan_layouts(
        _CONFIG.value, devices=_DEVICES.value, devices_per_host=_PER_HOST.value,
        device=_DEVICE.value, compile=not _NO_COMPILE.value, microbatches=microbatches,
        remat=_REMAT.value, log=lambda line: print(line, flush=True))
    print(plan.table(_TOP.value or None))
    if _JSON.value:
      with open(_JSON.value, "w", encoding="utf-8") as f:
        f.write(plan.to_json())
      print(f"wrote {len(plan.layouts)} layouts to {_JSON.value}")
    print(f"planned in {plan.seconds:.1f} s")
    plan.raise_if_none_fits()
  except errors.SpmdnnxError as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
