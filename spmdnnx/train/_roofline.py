"""Roofline model of one device kind: FLOP/s, HBM, links -> a step time.

`DEVICE_KINDS` holds public spec numbers per accelerator (dense bf16 peak,
HBM capacity and bandwidth, per-device bandwidth of the links within a host
and across hosts, one direction). `estimate_step` turns a layout's work
(FLOPs, HBM bytes, collective bytes by link level) into a step time:

  compute = max(FLOPs / peak, HBM bytes / HBM bandwidth)
  comm    = bytes within a host / host link bw + bytes across hosts / network bw
  step    = (compute + comm) / (1 - bubble)

Communication is *not* assumed to overlap compute (an upper bound on a real
step; ``step_overlap_s`` gives the other extreme, ``max(compute, comm)``).
The pipeline bubble ``(S - 1) / (R * M + S - 1)`` applies to stage layouts
with ``M`` pipeline microbatches and ``R`` repeats.

>>> kind = get_device_kind("h100")
>>> kind.peak_flops, kind.hbm_bytes
(989000000000000.0, 80000000000)
>>> est = estimate_step(kind, flops=989e12, hbm_bytes=0, bytes_within_host=450e9,
...                     bytes_across_hosts=0)
>>> round(est.step_s, 3), round(est.step_overlap_s, 3)
(2.0, 1.0)
"""

from __future__ import annotations

import dataclasses
import difflib

from spmdnnx import errors
from spmdnnx.train import _peaks


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  """Spec numbers of one accelerator (per device).

  Attributes:
    name: the ``--device`` name.
    description: the product it stands for.
    peak_flops: dense bf16 FLOP/s (`spmdnnx.train.PEAK_TFLOPS`).
    hbm_bytes: memory capacity (decimal bytes, as the vendor quotes it).
    hbm_bandwidth: HBM bytes/s.
    host_link_bandwidth: bytes/s one device sends to the others of its host
      (NVLink, or ICI inside a TPU slice), one direction.
    network_bandwidth: bytes/s one device sends to other hosts (its share of
      the host's NICs, or DCN), one direction.
  """

  name: str
  description: str
  peak_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  host_link_bandwidth: float
  network_bandwidth: float


def _peak(substring: str) -> float:
  return dict(_peaks.PEAK_TFLOPS)[substring] * 1e12


#: Known device kinds (see docs/planning.md for the sources of each number).
DEVICE_KINDS: dict[str, DeviceKind] = {
    k.name: k for k in (
        DeviceKind("h100", "NVIDIA H100 SXM5 80GB, NVLink 4, 8x400 Gb/s NDR per node",
                   _peak("h100"), 80 * 10**9, 3.35e12, 450e9, 50e9),
        DeviceKind("h200", "NVIDIA H200 SXM 141GB, NVLink 4, 8x400 Gb/s NDR per node",
                   _peak("h200"), 141 * 10**9, 4.8e12, 450e9, 50e9),
        DeviceKind("a100", "NVIDIA A100 SXM4 80GB, NVLink 3, 8x200 Gb/s HDR per node",
                   _peak("a100"), 80 * 10**9, 2.039e12, 300e9, 25e9),
        DeviceKind("tpu_v5e", "Google TPU v5e (v5 lite), ICI 1600 Gb/s per chip",
                   _peak("tpu v5e"), 16 * 10**9, 819e9, 200e9, 6.25e9),
        DeviceKind("tpu_v5p", "Google TPU v5p, ICI 4800 Gb/s per chip",
                   _peak("tpu v5p"), 95 * 10**9, 2.765e12, 600e9, 6.25e9),
    )
}


def get_device_kind(name: str) -> DeviceKind:
  """The `DeviceKind` called ``name`` (case-insensitive; ``-`` = ``_``).

  Raises:
    ConfigError: for an unknown name, listing the known ones.
  """
  key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
  if key in DEVICE_KINDS:
    return DEVICE_KINDS[key]
  close = difflib.get_close_matches(key, sorted(DEVICE_KINDS), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise errors.ConfigError(
      f"Unknown device kind {name!r}{hint}; known kinds: {', '.join(DEVICE_KINDS)}. "
      "Add a DeviceKind to spmdnnx.train.DEVICE_KINDS for another accelerator.",
      keys=[str(name)], known=sorted(DEVICE_KINDS))


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  """Seconds of one step on one device kind (see the module doc)."""

  compute_s: float
  flops_s: float
  hbm_s: float
  comm_s: float
  bubble: float
  step_s: float
  step_overlap_s: float


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle share of a pipeline: ``(S - 1) / (R * M + S - 1)``; 0 without one.

  >>> bubble_fraction(4, 8), bubble_fraction(1, 8), bubble_fraction(4, 0)
  (0.2727272727272727, 0.0, 0.0)
  """
  if stages <= 1 or microbatches <= 0:
    return 0.0
  return (stages - 1) / (max(repeats, 1) * microbatches + stages - 1)


def estimate_step(kind: DeviceKind, *, flops: float, hbm_bytes: float,
                  bytes_within_host: float, bytes_across_hosts: float,
                  bubble: float = 0.0) -> StepEstimate:
  """Step time of one device from its work per step.

  Args:
    kind: the device.
    flops: FLOPs one device executes per step (recomputation included).
    hbm_bytes: bytes one device reads and writes in HBM per step.
    bytes_within_host: collective wire bytes over links inside a host.
    bytes_across_hosts: collective wire bytes over the network.
    bubble: idle share of a pipeline (`bubble_fraction`).
  """
  flops_s = flops / kind.peak_flops
  hbm_s = hbm_bytes / kind.hbm_bandwidth
  compute = max(flops_s, hbm_s)
  comm = bytes_within_host / kind.host_link_bandwidth + \
      bytes_across_hosts / kind.network_bandwidth
  scale = 1.0 / (1.0 - bubble)
  return StepEstimate(compute, flops_s, hbm_s, comm, bubble, (compute + comm) * scale,
                      max(compute, comm) * scale)
