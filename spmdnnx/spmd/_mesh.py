"""Mesh planning: named parallelism degrees -> a validated device mesh.

A `MeshConfig` gives a degree for each kind of parallelism (`AXES`), at two
levels: ``ici`` within a slice (one process, or one TPU slice: fast links) and
``dcn`` across slices (slow links). ``-1`` fills whatever the other degrees of
its level leave, at most once per level. The resulting mesh has one axis per
name in `AXES`, in that order, each of size ``ici * dcn``; axes of size 1 are
kept, so axis rules can always name them.

Axis order runs from the least to the most communication-hungry kind of
parallelism (``data`` outermost, ``tensor`` innermost), which is the order
JAX's device-mesh utilities expect to place the busiest axis on the nearest
devices.

>>> dict(plan_abstract(MeshConfig(fsdp=-1, tensor=4), num_devices=512).shape)
{'data': 1, 'stage': 1, 'fsdp': 128, 'expert': 1, 'sequence': 1, 'tensor': 4}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from spmdnnx import errors

#: Mesh axis names, outermost (least communication) to innermost.
AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def _check_level(level: str, degrees: Mapping[str, Any] | None) -> tuple[int, ...]:
  degrees = dict(degrees or {})
  unknown = [k for k in degrees if k not in AXES]
  if unknown:
    raise errors.MeshError(
        f"MeshConfig {level}: unknown parallelism axis {errors.format_paths(map(repr, unknown))}; "
        f"valid axes are {', '.join(AXES)}.", axes=unknown, level=level)
  bad = [f"{k}={v!r}" for k, v in degrees.items()
         if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1)]
  if bad:
    raise errors.MeshError(
        f"MeshConfig {level}: invalid degree {errors.format_paths(bad)}; each "
        "degree is a positive int, or -1 to fill the remainder.",
        axes=[k for k, v in degrees.items()
              if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1)],
        level=level)
  fill = [k for k, v in degrees.items() if v == -1]
  if len(fill) > 1:
    raise errors.MeshError(
        f"MeshConfig {level}: {' and '.join(map(repr, fill))} are both -1; at most "
        "one axis per level may fill the remainder.", axes=fill, level=level)
  return tuple(degrees.get(a, 1) for a in AXES)


def _fmt(degrees: Sequence[int]) -> str:
  parts = [f"{a}={d}" for a, d in zip(AXES, degrees) if d != 1]
  return " x ".join(parts) if parts else "all 1"


def _fill(level: str, degrees: tuple[int, ...], count: int, unit: str) -> tuple[int, ...]:
  fixed = math.prod(d for d in degrees if d != -1)
  if -1 in degrees:
    axis = AXES[degrees.index(-1)]
    if count % fixed:
      raise errors.MeshError(
          f"MeshConfig {level}: the fixed degrees multiply to {fixed} "
          f"({_fmt([1 if d == -1 else d for d in degrees])}), "
          f"which does not divide the {count} {unit}, so {axis}=-1 cannot fill the "
          "remainder. Change the fixed degrees so their product divides "
          f"{count}.", axes=[axis], mesh=dict(zip(AXES, degrees)), level=level,
          product=fixed, count=count)
    return tuple(count // fixed if d == -1 else d for d in degrees)
  if fixed != count:
    offenders = [f"{a}={d}" for a, d in zip(AXES, degrees) if count % d]
    offenders = offenders or [f"{a}={d}" for a, d in zip(AXES, degrees) if d != 1]
    raise errors.MeshError(
        f"MeshConfig {level}: degrees multiply to {fixed} ({_fmt(degrees)}) but there "
        f"are {count} {unit}; offending axis: {', '.join(offenders) or 'none'}. "
        "Make the product equal the count, or set one axis to -1 to fill the "
        "remainder.", axes=[o.split("=")[0] for o in offenders],
        mesh=dict(zip(AXES, degrees)), level=level, product=fixed, count=count)
  return degrees


class MeshConfig:
  """Named parallelism degrees for a device mesh.

  Validated when created and frozen after: assigning an attribute raises
  `dataclasses.FrozenInstanceError`; `replace` returns a new, re-validated
  config. The hash is computed once.

  Args:
    ici: degrees within one slice/process, ``{axis: degree}``.
    dcn: degrees across slices/processes; all 1 (the default) means the ici
      degrees describe the whole device set.
    **degrees: shorthand for ``ici`` (``MeshConfig(fsdp=4, tensor=2)``).

  Raises:
    MeshError: on unknown axis names, degrees that are not positive ints or
      -1, or two -1 in one level.

  >>> MeshConfig(fsdp=-1, tensor=2).mesh_shape(8)
  {'data': 1, 'stage': 1, 'fsdp': 4, 'expert': 1, 'sequence': 1, 'tensor': 2}
  >>> MeshConfig(fsdp=-1, tensor=2).replace(tensor=4)
  MeshConfig(fsdp=-1, tensor=4)
  """

  __slots__ = ("_ici", "_dcn", "_hash")

  def __init__(self, *, ici: Mapping[str, int] | None = None,
               dcn: Mapping[str, int] | None = None, **degrees: int):
    if degrees and ici is not None:
      raise errors.MeshError(
          f"MeshConfig: give either ici={{...}} or degrees as keywords "
          f"({', '.join(degrees)}), not both.", axes=list(degrees))
    ici_t = _check_level("ici", degrees if ici is None else ici)
    dcn_t = _check_level("dcn", dcn)
    object.__setattr__(self, "_ici", ici_t)
    object.__setattr__(self, "_dcn", dcn_t)
    object.__setattr__(self, "_hash", hash((ici_t, dcn_t)))

  @property
  def ici(self) -> tuple[int, ...]:
    """Degrees within one slice, one per axis of `AXES` (-1: fill)."""
    return self._ici

  @property
  def dcn(self) -> tuple[int, ...]:
    """Degrees across slices, one per axis of `AXES` (-1: fill)."""
    return self._dcn

  def __setattr__(self, attr: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(
        f"MeshConfig is immutable (cannot set {attr!r}); use config.replace(...) "
        "for a new, validated MeshConfig.")

  def __delattr__(self, attr: str) -> None:
    raise dataclasses.FrozenInstanceError(f"MeshConfig is immutable (cannot delete {attr!r}).")

  def __reduce__(self) -> tuple:
    return (MeshConfig.from_dict, (self.to_dict(),))

  def replace(self, *, ici: Mapping[str, int] | None = None,
              dcn: Mapping[str, int] | None = None, **degrees: int) -> "MeshConfig":
    """A new config with some degrees changed, validated like the constructor.

    Args:
      ici: replaces every ici degree (axes not named become 1).
      dcn: replaces every dcn degree.
      **degrees: change single ici degrees, keeping the others.

    Raises:
      MeshError: as the constructor.
    """
    current = self.to_dict()
    if degrees and ici is not None:
      raise errors.MeshError(
          f"MeshConfig.replace: give either ici={{...}} or degrees as keywords "
          f"({', '.join(degrees)}), not both.", axes=list(degrees))
    new_ici = dict(current["ici"] if ici is None else ici)
    new_ici.update(degrees)
    return MeshConfig(ici=new_ici, dcn=current["dcn"] if dcn is None else dcn)

  @property
  def multi_level(self) -> bool:
    """Whether any dcn degree differs from 1 (a hybrid mesh is built)."""
    return any(d != 1 for d in self.dcn)

  def resolve(self, num_devices: int, num_slices: int = 1
             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Fills ``-1`` and checks the degrees against a device count.

    Args:
      num_devices: total number of devices.
      num_slices: number of slices (processes, or TPU slices).

    Returns:
      ``(ici_shape, dcn_shape)`` over `AXES`.

    Raises:
      MeshError: stating the product, the device count and the offending axis.
    """
    if num_devices < 1 or num_slices < 1 or num_devices % num_slices:
      raise errors.MeshError(
          f"{num_devices} devices cannot be split evenly into {num_slices} slices.",
          count=num_devices, slices=num_slices)
    if not self.multi_level:
      return _fill("ici", self.ici, num_devices, "devices"), (1,) * len(AXES)
    dcn = _fill("dcn", self.dcn, num_slices, "slices (processes)")
    ici = _fill("ici", self.ici, num_devices // num_slices, "devices per slice")
    return ici, dcn

  def mesh_shape(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """The final ``{axis: size}`` for a device count (ici x dcn per axis)."""
    ici, dcn = self.resolve(num_devices, num_slices)
    return {a: i * d for a, i, d in zip(AXES, ici, dcn)}

  def to_dict(self) -> dict:
    """JSON-able form; `from_dict` reads it back."""
    level = lambda ds: {a: d for a, d in zip(AXES, ds) if d != 1}
    return {"ici": level(self.ici), "dcn": level(self.dcn)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "MeshConfig":
    """Builds a config from ``{"ici": {...}, "dcn": {...}}`` or flat degrees."""
    if "ici" in data or "dcn" in data:
      extra = set(data) - {"ici", "dcn"}
      if extra:
        raise errors.MeshError(
            f"MeshConfig.from_dict: unexpected keys {sorted(extra)} next to ici/dcn; "
            "put per-axis degrees inside ici={...} or dcn={...}.", axes=sorted(extra))
      return cls(ici=data.get("ici", {}), dcn=data.get("dcn", {}))
    return cls(**data)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, MeshConfig) and (self.ici, self.dcn) == (other.ici, other.dcn)

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    d = self.to_dict()
    ici = ", ".join(f"{k}={v}" for k, v in d["ici"].items())
    if not d["dcn"]:
      return f"MeshConfig({ici})"
    return f"MeshConfig(ici={d['ici']!r}, dcn={d['dcn']!r})"


def _axis_types(axis_types: Any) -> tuple[AxisType, ...]:
  if isinstance(axis_types, str):
    if axis_types.lower() not in _AXIS_TYPES:
      raise errors.MeshError(
          f"Unknown axis_types {axis_types!r}; use 'auto', 'explicit' or "
          "jax.sharding.AxisType values.", axis_types=axis_types)
    return (_AXIS_TYPES[axis_types.lower()],) * len(AXES)
  if isinstance(axis_types, AxisType):
    return (axis_types,) * len(AXES)
  axis_types = tuple(axis_types)
  if len(axis_types) != len(AXES) or not all(isinstance(t, AxisType) for t in axis_types):
    raise errors.MeshError(
        f"axis_types must be 'auto', 'explicit', one AxisType or {len(AXES)} of "
        f"them (one per axis in {AXES}); got {axis_types!r}.", axis_types=axis_types,
        axes=AXES)
  return axis_types


def _slice_of(device: Any) -> int:
  # Only TPU slices are real "slices"; elsewhere (CPU/GPU) a process is one.
  index = getattr(device, "slice_index", None)
  if index is None or device.platform != "tpu":
    return device.process_index
  return index


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None, *,
              axis_types: Any = "auto") -> Mesh:
  """Builds a `jax.sharding.Mesh` with axes `AXES` from a `MeshConfig`.

  With dcn degrees all 1, the ici degrees cover every device and the order
  comes from `mesh_utils.create_device_mesh`; otherwise a hybrid mesh is built
  with `mesh_utils.create_hybrid_device_mesh`, slices being TPU slices or,
  elsewhere, processes.

  Args:
    config: the degrees.
    devices: devices to use (default: ``jax.devices()``).
    axis_types: ``"auto"`` (default: GSPMD propagation), ``"explicit"``, an
      `AxisType` or one per axis.

  Returns:
    A Mesh whose axis names are `AXES` (size-1 axes included).

  Raises:
    MeshError: if the degrees do not fit the devices.

  >>> mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  >>> mesh.shape["fsdp"], mesh.shape["tensor"], mesh.devices.size
  (4, 2, 8)
  """
  if not isinstance(config, MeshConfig):
    raise errors.MeshError(
        f"make_mesh expects a MeshConfig, got {type(config).__name__}; build one with "
        "MeshConfig(fsdp=-1, ...) or MeshConfig.from_dict(...).", got=type(config).__name__)
  devices = list(np.ravel(np.asarray(jax.devices() if devices is None else devices,
                                     dtype=object)))
  types = _axis_types(axis_types)
  slices = sorted({_slice_of(d) for d in devices})
  ici, dcn = config.resolve(len(devices), len(slices))
  if not config.multi_level:
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    sizes = {s: sum(_slice_of(d) == s for d in devices) for s in slices}
    if len(set(sizes.values())) != 1:
      raise errors.MeshError(
          f"A hybrid mesh needs the same number of devices in every slice; got "
          f"{sizes} devices per slice. Pass devices= with an equal number from each "
          "slice.", slices=sizes)
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices,
        process_is_granule=devices[0].platform != "tpu",
        allow_split_physical_axes=True)
  return Mesh(array, AXES, axis_types=types)


def plan_abstract(config: MeshConfig, num_devices: int, *, num_slices: int = 1,
                  axis_types: Any = "auto") -> AbstractMesh:
  """Plans a mesh for ``num_devices`` devices without having them.

  The result works wherever spmdnnx accepts a mesh for planning
  (`get_partition_spec`, `sharding_report`, `get_named_sharding`).

  Raises:
    MeshError: as `MeshConfig.resolve`.
  """
  shape = config.mesh_shape(num_devices, num_slices)
  return AbstractMesh(tuple(shape.values()), AXES, axis_types=_axis_types(axis_types))
