"""What a run reports: the progress line, ``metrics.jsonl``, TensorBoard.

Only process 0 writes (every process computes the same numbers). Throughput
is derived from the measured step time:

* ``tokens_per_s = batch_size * seq_len / step_time_s``
* ``tokens_per_s_per_device = tokens_per_s / device_count``
* ``tflops_per_device = flops_per_token * tokens_per_s_per_device / 1e12``,
  with ``flops_per_token`` the model's training FLOPs per token
  (`spmdnnx.models.flops_per_token`: 6 x parameters + attention);
* ``mfu = tflops_per_device * 1e12 / peak`` (`_peaks.peak_flops_per_device`),
  None where the peak is unknown (CPU).

>>> t = Throughput(tokens_per_step=1024, flops_per_token=6e6, num_devices=8, peak=None)
>>> m = t.of(0.5)
>>> m["tokens_per_s"], m["tokens_per_s_per_device"], m["mfu"]
(2048.0, 256.0, None)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

from tensorboardX import SummaryWriter

#: Keys of every training line of ``metrics.jsonl`` (eval lines add
#: ``eval_loss`` and ``eval_bits_per_byte``).
TRAIN_KEYS = ("step", "loss", "learning_rate", "grad_norm", "step_time_s", "tokens_per_s",
              "tokens_per_s_per_device", "tflops_per_device", "mfu")


@dataclasses.dataclass(frozen=True)
class Throughput:
  """Turns a step time into tokens/s, TFLOP/s per device and MFU."""

  tokens_per_step: int
  flops_per_token: float
  num_devices: int
  peak: float | None

  def of(self, step_time_s: float) -> dict[str, Any]:
    """Throughput metrics for one step time (seconds)."""
    tps = self.tokens_per_step / step_time_s
    per_dev = tps / self.num_devices
    tflops = self.flops_per_token * per_dev / 1e12
    mfu = None if self.peak is None else tflops * 1e12 / self.peak
    return {"tokens_per_s": tps, "tokens_per_s_per_device": per_dev,
            "tflops_per_device": tflops, "mfu": mfu}


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(m: Mapping[str, Any], *, total_steps: int, eta_s: float | None) -> str:
  """One human-readable line for a logged step."""
  width = len(str(total_steps))
  mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
  eta = "?" if eta_s is None else _duration(eta_s)
  return (f"step {m['step']:>{width}}/{total_steps} | loss {m['loss']:.4f} | "
          f"lr {m['learning_rate']:.2e} | gnorm {m['grad_norm']:.3f} | "
          f"{1e3 * m['step_time_s']:.1f} ms/step | {m['tokens_per_s']:,.0f} tok/s | "
          f"{m['tokens_per_s_per_device']:,.0f} tok/s/dev | "
          f"{m['tflops_per_device']:.3g} TFLOP/s/dev | MFU {mfu} | ETA {eta}")


def _clean(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else str(value)
  return value


class MetricsWriter:
  """Writes metrics of process 0 to stdout, ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: the run directory.
    enabled: False on every process but 0 (nothing is written).
    log: where progress lines go (default: print).
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               log: Callable[[str], None] = print):
    self.enabled = enabled
    self._log = log
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = SummaryWriter(logdir=workdir)

  def text(self, line: str) -> None:
    """Prints a line (process 0 only)."""
    if self.enabled:
      self._log(line)

  def write(self, metrics: Mapping[str, Any]) -> None:
    """Appends one record (must hold ``step``) to jsonl and TensorBoard."""
    if not self.enabled:
      return
    record = {k: _clean(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    step = int(metrics["step"])
    for key, value in metrics.items():
      if (key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
