"""Peak dense FLOP/s per device, for model FLOPs utilisation (MFU).

MFU = (model FLOPs per token x tokens per second per device) / device peak.
The table holds each chip's vendor-quoted dense (no sparsity) bf16 matmul
peak, the number MFU is conventionally reported against. A device whose kind
is not in the table (CPUs, unknown accelerators) has no peak: MFU is then
reported as None, never guessed.

| device kind (substring)  | peak dense bf16 TFLOP/s |
| ------------------------ | ----------------------- |
| H200                     | 989                     |
| H100 (SXM)               | 989                     |
| H100 PCIe                | 756                     |
| A100                     | 312                     |
| TPU v4                   | 275                     |
| TPU v5 lite (v5e)        | 197                     |
| TPU v5p                  | 459                     |
| TPU v6 lite (v6e)        | 918                     |

>>> peak_flops_per_device("NVIDIA H100 80GB HBM3")
989000000000000.0
>>> peak_flops_per_device("cpu") is None
True
"""

from __future__ import annotations

import jax

#: (lower-case substring of ``device.device_kind``, peak dense bf16 TFLOP/s);
#: the first match wins, so more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """The peak dense bf16 FLOP/s of one device, or None if unknown.

  Args:
    device_kind: a ``jax.Device.device_kind`` string; default: the first
      local device's.

  Returns:
    FLOP/s (not TFLOP/s), or None for CPUs and devices not in the table.
  """
  if device_kind is None:
    device_kind = jax.local_devices()[0].device_kind
  kind = device_kind.lower()
  for key, tflops in PEAK_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None
