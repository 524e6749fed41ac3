"""Step time of 2 processes x 4 devices vs 1 x 8, and launch.local start-up time.

Runs `python -m launch.local ... -- launch.train` for both layouts on the same
config and prints, per layout, the seconds from starting launch.local to the
first completed step (process start, imports, `jax.distributed`
initialization, data loading, model init, compilation) and the median step
time from metrics.jsonl, then the 2x4 / 1x8 ratio.

  python bench/launch_local.py [--config=configs/lm_tiny.py] [--steps=30]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(procs: int, devices: int, config: str, steps: int) -> dict:
  workdir = tempfile.mkdtemp(prefix=f"bench_{procs}x{devices}_")
  argv = [sys.executable, "-m", "launch.local", f"--num_processes={procs}",
          f"--devices_per_process={devices}", "--", f"--config={config}",
          f"--workdir={workdir}", f"--config.steps={steps}", "--config.log_every=1",
          "--config.eval_every=0", "--config.checkpoint_every=0", "--config.eval_batches=1"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  start = time.monotonic()
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  first_step = joined = None
  for line in proc.stdout:
    now = time.monotonic() - start
    if joined is None and "joined;" in line:
      joined = now
    if first_step is None and "step 1 (compilation included)" in line:
      first_step = now
  if proc.wait() != 0:
    raise SystemExit(f"{procs}x{devices} failed")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    times = [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r]
  return {"joined_s": joined, "first_step_s": first_step,
          "step_s": statistics.median(times[1:]), "total_s": time.monotonic() - start}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/lm_tiny.py")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  for _ in range(args.repeats):
    results = {}
    for procs, devices in ((1, 8), (2, 4)):
      results[procs] = r = run(procs, devices, args.config, args.steps)
      print(f"{procs}x{devices}: joined after {r['joined_s']:.1f} s, first step done after "
            f"{r['first_step_s']:.1f} s, median step {r['step_s'] * 1e3:.1f} ms, "
            f"total {r['total_s']:.1f} s", flush=True)
    print(f"step time 2x4 / 1x8: {results[2]['step_s'] / results[1]['step_s']:.2f}; "
          f"start-to-first-step 2x4 / 1x8: "
          f"{results[2]['first_step_s'] / results[1]['first_step_s']:.2f}", flush=True)


if __name__ == "__main__":
  main()
