"""Helpers of the launcher/fault tests: run launch.local and watch its output."""

import os
import pathlib
import re
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
E2E = pathlib.Path(__file__).resolve().parent


def env(**extra):
  """The environment of a launched job: this repo and tests/e2e importable."""
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(E2E)])
  e.update({k: str(v) for k, v in extra.items()})
  return e


class Job:
  """A running command whose merged output is read line by line in a thread."""

  def __init__(self, argv, *, env_extra=None):
    self.start = time.monotonic()
    self.proc = subprocess.Popen(argv, cwd=ROOT, env=env(**(env_extra or {})),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace")
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def wait_for(self, pattern, timeout=240):
    """Blocks until some output line (seen so far or later) matches; returns the match."""
    deadline = time.monotonic() + timeout
    while True:
      done = not self._reader.is_alive()
      for line in list(self.lines):
        m = re.search(pattern, line)
        if m:
          return m
      if done or time.monotonic() > deadline:
        raise AssertionError(f"no line matched {pattern!r}; output:\n{self.text[-4000:]}")
      time.sleep(0.05)

  def finish(self, timeout=300):
    """Waits for the exit (killing the command past `timeout`); returns its status."""
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      self.proc.stdout.close()
      raise
    self._reader.join(timeout=30)
    self.proc.stdout.close()
    return rc

  @property
  def text(self):
    return "".join(self.lines)

  def pid_of(self, rank):
    m = re.search(rf"launch\.local: process {rank} started \(pid (\d+)\)", self.text)
    return int(m.group(1))


def local(*args, module="_fault_worker", env_extra=None):
  """Starts `python -m launch.local --module=MODULE ARGS`."""
  return Job([sys.executable, "-m", "launch.local", f"--module={module}", *args],
             env_extra=env_extra)


def losses(text, rank=None):
  """{step: loss string} from `step S loss L` lines (of one rank's prefix if given)."""
  prefix = r"(?:\[\d+\] )?" if rank is None else rf"\[{rank}\] "
  return {int(s): l for s, l in re.findall(rf"(?m)^{prefix}step (\d+) loss (\S+)", text)}


def train_flags(workdir, steps=6, **overrides):
  """launch.train flags for a seconds-per-step byte MLP on the stdlib's email package."""
  import sysconfig
  corpus = os.path.join(sysconfig.get_paths()["stdlib"], "email", "**", "*.py")
  cfg = {"model.embed_dim": 16, "model.mlp_dim": 32, "model.head_dim": 16, "steps": steps,
         "batch_size": 8, "seq_len": 16, "log_every": 1, "eval_every": 0, "eval_batches": 1,
         "checkpoint_every": 2, "data.path": corpus, "data.eval_fraction": 0.2, **overrides}
  return ["--config=configs/mlp_quick.py", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in cfg.items()]


def train_local(procs, devices, workdir, *, steps=6, flags=(), env_extra=None, **overrides):
  """Starts launch.local running launch.train (every step's local batch logged)."""
  return Job([sys.executable, "-m", "launch.local", f"--num_processes={procs}",
              f"--devices_per_process={devices}", "--", *train_flags(workdir, steps, **overrides),
              *flags], env_extra={"SPMDNNX_LOG_LOCAL_BATCHES": 1, **(env_extra or {})})


def metrics(workdir):
  """{step: loss} from DIR/metrics.jsonl (a later line for a step wins)."""
  import json
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        out[record["step"]] = record["loss"]
  return out


def batch_lines(text):
  """{(process, step): (rows, of, checksum)} from the per-process local batch lines."""
  found = re.findall(r"process (\d+) of \d+: step (\d+) batch rows (\S+) of (\d+), "
                     r"checksum (-?\d+)", text)
  return {(int(p), int(s)): (rows, int(n), int(c)) for p, s, rows, n, c in found}
