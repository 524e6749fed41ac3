"""Sharding report: where every Variable lives and what it costs per device.

A Variable whose value is a `jax.Array` laid out with a NamedSharding is
reported as it actually is. Other values (abstract `ShapeDtypeStruct`s, host
arrays, single-device arrays) are reported as the rules would place them on
the mesh, so an abstract State and an `AbstractMesh` from `plan_abstract`
size a large layout without devices. Passing ``mesh`` or ``rules``
explicitly makes every row planned.

>>> import jax.numpy as jnp
>>> from spmdnnx._state import State
>>> from spmdnnx._variables import Param
>>> s = State({"w": Param(jnp.zeros((8, 4)), logical_axes=("embed", "mlp"))})
>>> from spmdnnx.spmd._mesh import MeshConfig, plan_abstract
>>> mesh = plan_abstract(MeshConfig(fsdp=4, tensor=2), num_devices=8)
>>> r = sharding_report(s, mesh=mesh, rules="fsdp_tp")
>>> r.rows[0].bytes_per_device, r.rows[0].replicated
(16, False)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from spmdnnx import errors
from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _mesh_axes as mesh_axes_lib
from spmdnnx.spmd import _partition as partition
from spmdnnx.spmd import _resolve as resolve_lib
from spmdnnx._variables import OptState, Param, Variable

#: Parameters at least this large (bytes) are warned about when unannotated
#: or fully replicated on a multi-device mesh.
LARGE_BYTES = 1 << 20

KINDS = ("params", "opt_state", "other")


@dataclasses.dataclass(frozen=True)
class Row:
  """One Variable (or array) of the report."""

  path: str
  type: str
  kind: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple | None
  spec: tuple
  bytes: int
  bytes_per_device: int
  replicated: bool
  source: str


def _kind(leaf: Any) -> str:
  if isinstance(leaf, Param):
    return "params"
  if isinstance(leaf, OptState):
    return "opt_state"
  return "other"


def _spec_json(entry: Any) -> Any:
  if entry is None or isinstance(entry, str):
    return entry
  return list(entry)


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
    n /= 1024
  return str(n)


def _spec_str(spec: tuple) -> str:
  if not any(e is not None for e in spec):
    return "replicated"
  parts = ["None" if e is None else e if isinstance(e, str) else "(" + ",".join(e) + ")"
           for e in spec]
  return "P(" + ", ".join(parts) + ")"


class ShardingReport:
  """Rows per Variable plus per-device totals; print it or call `to_dict`.

  Attributes:
    rows: one `Row` per array leaf, in State order.
    mesh_shape: ``{axis: size}`` of the mesh used for planned rows.
    warnings: the warning messages issued while building the report.
  """

  def __init__(self, rows: list[Row], mesh_shape: dict[str, int], warnings_: list[str]):
    self.rows = rows
    self.mesh_shape = mesh_shape
    self.warnings = warnings_

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh_shape.values()) if self.mesh_shape else 1

  def totals(self) -> dict[str, dict[str, int]]:
    """``{"per_device": {kind: bytes}, "global": {kind: bytes}}`` with a "total"."""
    per, glob = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    for r in self.rows:
      per[r.kind] += r.bytes_per_device
      glob[r.kind] += r.bytes
    per["total"], glob["total"] = sum(per.values()), sum(glob.values())
    return {"per_device": per, "global": glob}

  @property
  def replicated_param_fraction(self) -> float:
    """Fraction of parameter bytes that every device holds in full."""
    total = sum(r.bytes for r in self.rows if r.kind == "params")
    repl = sum(r.bytes for r in self.rows if r.kind == "params" and r.replicated)
    return repl / total if total else 0.0

  def to_dict(self) -> dict:
    """A JSON-able dict of everything in the report."""
    rows = []
    for r in self.rows:
      d = dataclasses.asdict(r)
      d["shape"] = list(r.shape)
      d["logical_axes"] = None if r.logical_axes is None else list(r.logical_axes)
      d["spec"] = [_spec_json(e) for e in r.spec]
      rows.append(d)
    return {"mesh": dict(self.mesh_shape), "num_devices": self.num_devices,
            "rows": rows, "totals": self.totals(),
            "replicated_param_fraction": self.replicated_param_fraction,
            "warnings": list(self.warnings)}

  def __str__(self) -> str:
    header = ("path", "type", "shape", "dtype", "logical axes", "sharding", "bytes/device",
              "replicated")
    table = [header]
    for r in self.rows:
      axes = "-" if r.logical_axes is None else "(" + ", ".join(map(str, r.logical_axes)) + ")"
      table.append((r.path, r.type, "x".join(map(str, r.shape)) or "scalar", r.dtype, axes,
                    _spec_str(r.spec), _human(r.bytes_per_device),
                    "yes" if r.replicated else ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mesh = " x ".join(f"{a}={s}" for a, s in self.mesh_shape.items()) or "none"
    t = self.totals()
    per = ", ".join(f"{k} {_human(v)}" for k, v in t["per_device"].items())
    glob = ", ".join(f"{k} {_human(v)}" for k, v in t["global"].items())
    lines += ["", f"mesh: {mesh} ({self.num_devices} devices)",
              f"per device: {per}", f"global: {glob}",
              f"replicated parameter bytes: {self.replicated_param_fraction:.1%}"]
    lines += [f"warning: {w}" for w in self.warnings]
    return "\n".join(lines)

  __repr__ = __str__


def _actual(value: Any) -> NamedSharding | None:
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    sharding = value.sharding
    if isinstance(sharding, NamedSharding):
      return sharding
  return None


def sharding_report(model_or_state: Any, mesh: Any = None, rules: Any = None, *,
                    strict_replicated_fraction: float | None = None,
                    large_bytes: int = LARGE_BYTES) -> ShardingReport:
  """Reports the layout of every Variable of a Module or State.

  Args:
    model_or_state: a Module, State (possibly abstract) or pytree.
    mesh: a Mesh, AbstractMesh or ``{axis: size}``; default: the context's.
    rules: default: the context's.
    strict_replicated_fraction: if given, raise when more than this fraction
      of parameter bytes is fully replicated.
    large_bytes: size from which unannotated or replicated parameters warn.

  Returns:
    A `ShardingReport`.

  Raises:
    ShardingError: in strict mode, or when rows need planning and no mesh or
      rules are given or active.

  Warns:
    ShardingWarning: once, for large unannotated or fully replicated
      parameters on a multi-device mesh.
  """
  explicit = mesh is not None or rules is not None
  paths, leaves, _ = partition.flatten_with_paths(model_or_state)
  items = []
  for path, leaf in zip(paths, leaves):
    value = leaf.raw_value if isinstance(leaf, Variable) else leaf
    if getattr(value, "shape", None) is not None and getattr(value, "dtype", None) is not None:
      items.append((path, leaf, value, None if explicit else _actual(value)))
  planned = [it for it in items if it[3] is None]
  mesh_shape: dict[str, int] = {}
  specs = {}
  if planned:
    mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="sharding_report")
    mesh_shape = mesh_axes_lib.axis_sizes(mesh)
    found = resolve_lib.leaf_specs([p for p, *_ in planned], [l for _, l, *_ in planned],
                                   rules, mesh_shape)
    specs = {id(it): s for it, s in zip(planned, found)}
  rows = []
  for it in items:
    path, leaf, value, actual = it
    if actual is not None:
      sizes, spec = dict(actual.mesh.shape), tuple(actual.spec)
      mesh_shape = mesh_shape or sizes
    else:
      sizes, spec = mesh_shape, tuple(specs[id(it)])
    shape = tuple(value.shape)
    spec = spec + (None,) * (len(shape) - len(spec))
    itemsize = np.dtype(value.dtype).itemsize if not jax.dtypes.issubdtype(
        value.dtype, jax.dtypes.prng_key) else value.dtype.itemsize
    block = mesh_axes_lib.shard_shape(shape, jax.sharding.PartitionSpec(*spec), sizes)
    nbytes, per = math.prod(shape) * itemsize, math.prod(block) * itemsize
    rows.append(Row(errors.path_str(path), type(leaf).__name__, _kind(leaf), shape,
                    str(value.dtype), leaf.logical_axes if isinstance(leaf, Variable) else None,
                    spec, nbytes, per, math.prod(sizes.values()) > 1 and block == shape,
                    "actual" if actual is not None else "rules"))
  report = ShardingReport(rows, mesh_shape, [])
  _check(report, strict_replicated_fraction, large_bytes)
  return report


def _check(report: ShardingReport, strict: float | None, large_bytes: int) -> None:
  params = [r for r in report.rows if r.kind == "params" and r.bytes >= large_bytes]
  if report.num_devices > 1:
    unannotated = [f"{r.path} ({_human(r.bytes)})" for r in params if r.logical_axes is None]
    replicated = [f"{r.path} ({_human(r.bytes)})" for r in params
                  if r.replicated and r.logical_axes is not None]
    if unannotated:
      report.warnings.append(
          f"{len(unannotated)} large parameter(s) have no logical_axes and are "
          f"replicated on every device: {errors.format_paths(unannotated)}. Annotate them "
          "(Param(..., logical_axes=(...)) or with_partitioning).")
    if replicated:
      report.warnings.append(
          f"{len(replicated)} large parameter(s) are fully replicated by the rules: "
          f"{errors.format_paths(replicated)}. Check the rules for their logical names.")
    for message in report.warnings:
      warnings.warn(errors.ShardingWarning(message), stacklevel=3)
  if strict is not None and report.replicated_param_fraction > strict:
    biggest = sorted((r for r in report.rows if r.kind == "params" and r.replicated),
                     key=lambda r: -r.bytes)
    listed = [f"{r.path} ({_human(r.bytes)}, axes {r.logical_axes})" for r in biggest]
    raise errors.ShardingError(
        f"{report.replicated_param_fraction:.1%} of parameter bytes are fully "
        f"replicated, more than the allowed {strict:.1%}: {errors.format_paths(listed)}. "
        "Annotate these parameters or change the axis rules so they are sharded.",
        paths=[r.path for r in biggest], shapes=[r.shape for r in biggest],
        axes=[r.logical_axes for r in biggest])
