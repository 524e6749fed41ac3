"""Sharding report: where every Variable lives and what it costs per device.

Two modes:

* **placement** (no ``mesh``/``rules`` arguments): a Variable whose value is a
  concrete `jax.Array` is reported where it really is (its ``.sharding``: a
  mesh layout, or e.g. one device). When a `use_sharding` context is active,
  each such row is also compared with the rules' plan, and rows placed
  differently (say an array on one device whose plan is ``P('fsdp',
  'tensor')``) are flagged: a ``plan`` column, one `ShardingWarning`, and with
  ``strict_placement=True`` a `ShardingError`. Abstract values
  (`jax.ShapeDtypeStruct`, tracers) and host arrays show the plan; they and
  arrays not on a NamedSharding need the context's mesh and rules.
* **planning** (``mesh`` or ``rules`` given): every row shows the plan for that
  mesh and rules, whatever the arrays' current placement, so an abstract
  State and an `AbstractMesh` from `plan_abstract` size a large layout
  without devices.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
  #: Where the array is when it is not on a NamedSharding ("1 device (...)").
  placement: str | None = None
  #: The rules' plan for this row, when a plan was computed.
  planned: tuple | None = None
  #: Whether a concrete array sits elsewhere than its plan says.
  differs: bool = False


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

  @property
  def misplaced(self) -> list[Row]:
    """Rows whose concrete array is placed differently from the rules' plan."""
    return [r for r in self.rows if r.differs]

  def to_dict(self) -> dict:
    """A JSON-able dict of everything in the report."""
    rows = []
    for r in self.rows:
      d = dataclasses.asdict(r)
      d["shape"] = list(r.shape)
      d["logical_axes"] = None if r.logical_axes is None else list(r.logical_axes)
      d["spec"] = [_spec_json(e) for e in r.spec]
      d["planned"] = None if r.planned is None else [_spec_json(e) for e in r.planned]
      rows.append(d)
    return {"mesh": dict(self.mesh_shape), "num_devices": self.num_devices,
            "rows": rows, "totals": self.totals(),
            "replicated_param_fraction": self.replicated_param_fraction,
            "warnings": list(self.warnings)}

  def __str__(self) -> str:
    header = ("path", "type", "shape", "dtype", "logical axes", "sharding", "bytes/device",
              "replicated")
    flagged = bool(self.misplaced)
    if flagged:
      header += ("differs from plan",)
    table = [header]
    for r in self.rows:
      axes = "-" if r.logical_axes is None else "(" + ", ".join(map(str, r.logical_axes)) + ")"
      row = (r.path, r.type, "x".join(map(str, r.shape)) or "scalar", r.dtype, axes,
             r.placement or _spec_str(r.spec), _human(r.bytes_per_device),
             "yes" if r.replicated else "")
      if flagged:
        row += (f"plan {_spec_str(r.planned)}" if r.differs else "",)
      table.append(row)
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


def _placement(value: Any) -> jax.sharding.Sharding | None:
  """The sharding of a concrete jax.Array; None for abstract, traced or host values."""
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    return value.sharding
  return None


def _describe(sharding: jax.sharding.Sharding) -> str:
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  if len(devices) == 1:
    return f"1 device ({devices[0]})"
  return f"{type(sharding).__name__} over {len(devices)} devices"


def _effective(spec: tuple, sizes: dict[str, int]) -> tuple:
  """A spec without its size-1 mesh axes and trailing Nones (for comparison)."""
  out = []
  for entry in spec:
    axes = tuple(a for a in mesh_axes_lib.entry_axes(entry) if sizes.get(a, 1) > 1)
    out.append(axes or None)
  while out and out[-1] is None:
    out.pop()
  return tuple(out)


def _differs(actual: jax.sharding.Sharding, planned: tuple, mesh: Any, ndim: int) -> bool:
  """Whether a concrete array's sharding is not the planned layout on ``mesh``."""
  if isinstance(mesh, Mesh):
    try:
      return not actual.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*planned)), ndim)
    except ValueError:
      return True
  sizes = mesh_axes_lib.axis_sizes(mesh)
  if isinstance(actual, NamedSharding):
    return (_effective(tuple(actual.spec), dict(actual.mesh.shape))
            != _effective(planned, sizes) or dict(actual.mesh.shape) != sizes)
  return math.prod(sizes.values()) > 1 or len(actual.device_set) > 1


def sharding_report(model_or_state: Any, mesh: Any = None, rules: Any = None, *,
                    strict_replicated_fraction: float | None = None,
                    strict_placement: bool = False,
                    large_bytes: int = LARGE_BYTES) -> ShardingReport:
  """Reports the layout of every Variable of a Module or State.

  Args:
    model_or_state: a Module, State (possibly abstract) or pytree.
    mesh: a Mesh, AbstractMesh or ``{axis: size}`` to plan every row for;
      default: real placements, compared with the context's plan.
    rules: as ``mesh`` (giving either plans every row).
    strict_replicated_fraction: if given, raise when more than this fraction
      of parameter bytes is fully replicated.
    strict_placement: raise when a concrete array is placed differently from
      the rules' plan (instead of only warning).
    large_bytes: size from which unannotated or replicated parameters warn.

  Returns:
    A `ShardingReport`.

  Raises:
    ShardingError: in strict mode, or when rows need a plan (abstract values,
      arrays not on a NamedSharding) and no mesh or rules are given or active.

  Warns:
    ShardingWarning: once for arrays placed differently from the plan, and
      once for large unannotated or fully replicated parameters on a
      multi-device mesh.
  """
  explicit = mesh is not None or rules is not None
  paths, leaves, _ = partition.flatten_with_paths(model_or_state)
  items = []
  for path, leaf in zip(paths, leaves):
    value = leaf.raw_value if isinstance(leaf, Variable) else leaf
    if getattr(value, "shape", None) is not None and getattr(value, "dtype", None) is not None:
      items.append((path, leaf, value, None if explicit else _placement(value)))
  needs_plan = any(not isinstance(actual, NamedSharding) for *_, actual in items)
  mesh_shape: dict[str, int] = {}
  plans: list[tuple | None] = [None] * len(items)
  if needs_plan or (items and context_lib.current_context() is not None):
    mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="sharding_report")
    mesh_shape = mesh_axes_lib.axis_sizes(mesh)
    with warnings.catch_warnings():
      if not needs_plan:  # the plan is only compared, not shown: sharded_init already warned
        warnings.simplefilter("ignore", errors.ShardingWarning)
      found = resolve_lib.leaf_specs([p for p, *_ in items], [l for _, l, *_ in items],
                                     rules, mesh_shape)
    plans = [tuple(s) for s in found]
  rows = []
  for (path, leaf, value, actual), plan in zip(items, plans):
    shape = tuple(value.shape)
    if plan is not None:
      plan = plan + (None,) * (len(shape) - len(plan))
    placement = None
    if isinstance(actual, NamedSharding):
      spec, sizes = tuple(actual.spec), dict(actual.mesh.shape)
      mesh_shape = mesh_shape or sizes
    elif actual is not None:
      spec, sizes, placement = (), {}, _describe(actual)
    else:
      spec, sizes = plan, mesh_shape
    spec = spec + (None,) * (len(shape) - len(spec))
    itemsize = np.dtype(value.dtype).itemsize if not jax.dtypes.issubdtype(
        value.dtype, jax.dtypes.prng_key) else value.dtype.itemsize
    if actual is not None:
      block = tuple(actual.shard_shape(shape))
    else:
      block = mesh_axes_lib.shard_shape(shape, PartitionSpec(*spec), sizes)
    nbytes, per = math.prod(shape) * itemsize, math.prod(block) * itemsize
    differs = actual is not None and plan is not None and _differs(actual, plan, mesh, len(shape))
    devices = math.prod((sizes or mesh_shape).values())
    rows.append(Row(errors.path_str(path), type(leaf).__name__, _kind(leaf), shape,
                    str(value.dtype), leaf.logical_axes if isinstance(leaf, Variable) else None,
                    spec, nbytes, per, devices > 1 and block == shape,
                    "actual" if actual is not None else "rules", placement, plan, differs))
  report = ShardingReport(rows, mesh_shape, [])
  _check(report, strict_replicated_fraction, large_bytes, strict_placement)
  return report


def _check(report: ShardingReport, strict: float | None, large_bytes: int,
           strict_placement: bool = False) -> None:
  params = [r for r in report.rows if r.kind == "params" and r.bytes >= large_bytes]
  misplaced = report.misplaced
  if misplaced:
    listed = [f"{r.path} (is {r.placement or _spec_str(r.spec)}, plan {_spec_str(r.planned)})"
              for r in misplaced]
    message = (
        f"{len(misplaced)} array(s) are not placed as the axis rules plan: "
        f"{errors.format_paths(listed)}. They were probably created or changed outside "
        "sharded_init / nnx.jit under use_sharding; lay them out with "
        "jax.device_put(state, spmdnnx.get_named_sharding(state)) or build the model "
        "with spmdnnx.sharded_init.")
    if strict_placement:
      raise errors.ShardingError(
          message, paths=[r.path for r in misplaced], shapes=[r.shape for r in misplaced],
          axes=[r.logical_axes for r in misplaced], specs=[r.planned for r in misplaced])
    report.warnings.append(message)
    if report.num_devices <= 1:
      warnings.warn(errors.ShardingWarning(message), stacklevel=3)
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
