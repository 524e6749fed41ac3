"""Reading a compiled XLA program: collectives and matmul FLOPs per step.

`analyze_hlo` walks the text of a compiled (SPMD-partitioned) HLO module.
Every computation gets a multiplicity: how many times one execution of the
entry computation runs it (a ``while`` body runs ``known_trip_count`` times,
so the 80 scanned layers of a model count 80 times, and a microbatch loop
around them multiplies again). Each collective then counts its bytes that
many times, and each ``dot`` its FLOPs.

Bytes of a collective are the bytes one device puts on the wire per
execution under the bandwidth-optimal (ring) algorithm, for a group of ``n``
devices holding a result of ``r`` bytes:

* all-gather: ``r * (n - 1) / n`` (the result is the gathered array);
* reduce-scatter: ``r * (n - 1)`` (the operand is ``n`` results);
* all-reduce: ``2 * r * (n - 1) / n`` (a reduce-scatter then an all-gather);
* all-to-all: ``r * (n - 1) / n``;
* collective-permute: ``r``.

A group is *across hosts* when its devices sit on more than one host
(device ``i`` of the program is on host ``host_of[i]``).

>>> text = '''HloModule m
... ENTRY %main (p: f32[8]) -> f32[32] {
...   %p = f32[8]{0} parameter(0)
...   ROOT %ag = f32[32]{0} all-gather(%p), replica_groups=[1,4]<=[4], dimensions={0}
... }'''
>>> stats = analyze_hlo(text, num_devices=4)
>>> stats.bytes_by_kind["all-gather"], stats.count_by_kind["all-gather"]
(96.0, 1)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

import numpy as np

#: The collective kinds reported, in table order.
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z][a-z0-9]*\[[0-9,]*\])")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|"
                     r"false_computation)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9,]+\},?)*)\}")


@dataclasses.dataclass
class HloStats:
  """What one step of a compiled program does, per device.

  Attributes:
    bytes_by_kind: wire bytes per step of each kind in `COLLECTIVE_KINDS`.
    count_by_kind: collective executions per step of each kind.
    bytes_within_host: wire bytes of groups inside one host.
    bytes_across_hosts: wire bytes of groups spanning hosts.
    dot_flops: FLOPs of every ``dot`` per step (2 per multiply-add).
    unknown_trip_counts: while loops without a known trip count (counted once).
  """

  bytes_by_kind: dict = dataclasses.field(
      default_factory=lambda: {k: 0.0 for k in COLLECTIVE_KINDS})
  count_by_kind: dict = dataclasses.field(
      default_factory=lambda: {k: 0 for k in COLLECTIVE_KINDS})
  bytes_within_host: float = 0.0
  bytes_across_hosts: float = 0.0
  dot_flops: float = 0.0
  unknown_trip_counts: int = 0

  @property
  def total_bytes(self) -> float:
    """Wire bytes per step, all kinds."""
    return float(sum(self.bytes_by_kind.values()))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def type_bytes(text: str) -> float:
  """Bytes of an HLO type (an array or a tuple of arrays).

  >>> type_bytes("(f32[2,3]{1,0}, bf16[4])")
  32.0
  """
  total = 0.0
  for dtype, dims in _ARRAY.findall(_COMMENT.sub("", text)):
    if dtype not in _DTYPE_BYTES:
      continue
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(text: str) -> list[int]:
  m = _ARRAY.search(text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _split_type(rest: str) -> tuple[str, str]:
  """``"TYPE op(...)..."`` -> (TYPE, ``"op(...)..."``); TYPE may be a tuple."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _groups(line: str, num_devices: int) -> list[list[int]]:
  """The device groups of a collective (one group of all devices if unstated)."""
  m = _IOTA_GROUPS.search(line)
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(-1, shape[-1]).tolist()
  m = _MESH_GROUPS.search(line)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    rest = [i for i in range(len(sizes)) if i not in chosen]
    ids = ids.transpose(rest + chosen)
    return ids.reshape(-1, math.prod(sizes[i] for i in chosen) if chosen else 1).tolist()
  m = _PAIRS.search(line)
  if m:
    return [[int(x) for x in g.split(",")] for g in re.findall(r"\{([0-9,]+)\}", m.group(1))]
  m = _LIST_GROUPS.search(line)
  if m and m.group(1):
    return [[int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
  return [list(range(num_devices))]


def _wire_bytes(kind: str, result_bytes: float, n: int) -> float:
  if n <= 1 and kind != "collective-permute":
    return 0.0
  if kind == "all-gather" or kind == "all-to-all":
    return result_bytes * (n - 1) / n
  if kind == "reduce-scatter":
    return result_bytes * (n - 1)
  if kind == "all-reduce":
    return 2.0 * result_bytes * (n - 1) / n
  return result_bytes


@dataclasses.dataclass
class _Computation:
  name: str
  lines: list
  shapes: dict


def _parse(text: str) -> tuple[list[_Computation], str | None]:
  comps: list[_Computation] = []
  entry = None
  current = None
  for raw in text.splitlines():
    line = _COMMENT.sub("", raw)
    head = _HEADER.match(line)
    if head:
      current = _Computation(head.group(2), [], dict(_PARAM.findall(head.group(3))))
      comps.append(current)
      if head.group(1):
        entry = current.name
      continue
    if current is None:
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      typ, rest = _split_type(m.group(3))
      current.shapes[m.group(2)] = typ
      current.lines.append((m.group(2), typ, rest, raw))
  return comps, entry


def _multiplicities(comps: list[_Computation], entry: str | None) -> tuple[dict, int]:
  """Executions of each computation per run of the entry (callers print last)."""
  mult: dict[str, float] = collections.defaultdict(float)
  unknown = 0
  if entry is None:
    return mult, unknown
  mult[entry] = 1.0
  for comp in reversed(comps):
    m = mult.get(comp.name, 0.0)
    if not m:
      continue
    for _, _, rest, raw in comp.lines:
      trip = 1
      if " while(" in " " + rest or rest.startswith("while("):
        t = _TRIP.search(raw)
        if t:
          trip = int(t.group(1))
        else:
          unknown += 1
      for key, callee in _CALLEE.findall(rest):
        if key == "to_apply" and not rest.startswith(("call(", "async-start(")):
          continue  # reductions' scalar combiners
        mult[callee] += m * (trip if key in ("body", "condition") else 1)
      b = _BRANCHES.search(rest)
      if b:
        for callee in re.findall(r"%([^\s,]+)", b.group(1)):
          mult[callee] += m
  return mult, unknown


def analyze_hlo(text: str, *, num_devices: int,
                host_of: Sequence[int] | None = None) -> HloStats:
  """Collectives (bytes and counts by kind) and dot FLOPs of one step.

  Args:
    text: ``compiled.as_text()`` of an SPMD-partitioned program.
    num_devices: devices of the program.
    host_of: host index of each device id (default: all on one host).

  Returns:
    An `HloStats`, per device and per execution of the program.
  """
  hosts = np.zeros(num_devices, dtype=np.int64) if host_of is None else np.asarray(host_of)
  comps, entry = _parse(text)
  mult, unknown = _multiplicities(comps, entry)
  stats = HloStats(unknown_trip_counts=unknown)
  for comp in comps:
    m = mult.get(comp.name, 0.0)
    if not m:
      continue
    for _, typ, rest, raw in comp.lines:
      op = rest.split("(", 1)[0]
      if op == "dot":
        operands = re.findall(r"%([^\s,)]+)", rest.split(")", 1)[0])
        lhs = _dims(comp.shapes.get(operands[0], "")) if operands else []
        contract = _CONTRACT.search(rest)
        k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i) \
            if contract and lhs else 1
        stats.dot_flops += m * 2.0 * math.prod(_dims(typ)) * k
        continue
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in COLLECTIVE_KINDS:
        continue
      result = typ
      if op.endswith("-start") and typ.startswith("("):
        # async start: (operands..., result[, context]); the result is the
        # last array whose bytes differ for gather/scatter; take the largest
        # for all-gather, the smallest for reduce-scatter, else the first.
        parts = [p for p in _ARRAY.findall(typ)]
        sizes = [type_bytes(f"{d}[{s}]") for d, s in parts]
        pick = max(sizes) if kind == "all-gather" else (
            min(sizes) if kind == "reduce-scatter" else sizes[0])
        result_bytes = pick
      else:
        result_bytes = type_bytes(result)
      groups = _groups(raw, num_devices)
      n = max(len(g) for g in groups)
      wire = m * _wire_bytes(kind, result_bytes, n)
      across = any(len({int(hosts[i]) for i in g if i < len(hosts)}) > 1 for g in groups)
      stats.bytes_by_kind[kind] += wire
      stats.count_by_kind[kind] += int(m)
      if across:
        stats.bytes_across_hosts += wire
      else:
        stats.bytes_within_host += wire
  return stats


def cost_flops(compiled: object) -> float | None:
  """``compiled.cost_analysis()["flops"]`` (XLA's own count), or None."""
  try:
    cost = compiled.cost_analysis()
  except (RuntimeError, NotImplementedError):  # some backends have no cost model
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get("flops")
  return None if value is None else float(value)
