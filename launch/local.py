"""Run a multi-process job on this machine: N processes x K fake CPU devices.

Example (2 processes of 4 devices each form one 8-device mesh over gloo):

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      --config=configs/lm_tiny.py --workdir=/tmp/run

Everything after ``--`` goes to ``python -m launch.train`` (or ``--module``);
the launcher adds --coordinator_address, --num_processes and --process_id.
Output lines carry a ``[rank]`` prefix. When a process dies the others are
stopped and the launcher exits non-zero naming it; SIGTERM is forwarded.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from spmdnnx import train

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")
_MODULE = flags.DEFINE_string("module", "launch.train", "Python module each process runs.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: pick a free one).")
_EXIT_GRACE = flags.DEFINE_float(
    "exit_grace", 60.0, "Seconds the other processes may run on after one exited cleanly.")
_TERM_GRACE = flags.DEFINE_float(
    "term_grace", 300.0, "Seconds processes get to save and exit after SIGTERM.")


def main(argv):
  command = [sys.executable, "-m", _MODULE.value] + list(argv[1:])
  return train.launch_local(
      command, num_processes=_NUM_PROCESSES.value, devices_per_process=_DEVICES.value,
      port=_PORT.value or None, exit_grace_s=_EXIT_GRACE.value, term_grace_s=_TERM_GRACE.value)


if __name__ == "__main__":
  app.run(main)
