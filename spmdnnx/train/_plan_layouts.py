"""Candidate mesh layouts of a run config, and their exact per-device bytes.

`enumerate_layouts` factors a device count over the parallelism axes the
config's axis rules use (``data``, ``fsdp``, ``tensor``, ``sequence``,
``expert``, ``stage``), splits each degree into a within-host and an
across-host part (innermost axes fill a host first; ``tensor`` never crosses
a host), and keeps a layout only when the runtime's own `validate` accepts it
(batch, microbatch and sequence divisibility, process count) and the rules
divide every annotated parameter dimension they mean to split (the runtime
would otherwise replicate that dimension with a warning). Every rejected
layout keeps its reason.

`abstract_state` builds the model and its optimizer with `nnx.eval_shape`
(shapes, dtypes, logical axes; nothing allocated); `state_bytes` then gives
the exact bytes each device holds of every Variable under a layout, from the
same rule resolution `jit` and `sharded_init` use.

>>> from spmdnnx.train._config import base_config
>>> cfg = base_config()
>>> layouts, skipped = enumerate_layouts(cfg, devices=8, devices_per_host=8)
>>> sorted(l.name for l in layouts)[:3]
['data=2,fsdp=2,tensor=2', 'data=2,fsdp=4', 'data=4,fsdp=2']
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import ml_collections

from spmdnnx import errors
from spmdnnx import models
from spmdnnx._optim import Optimizer
from spmdnnx._rngs import Rngs
from spmdnnx._transforms.misc import eval_shape
from spmdnnx._graph import state as graph_state
from spmdnnx._variables import OptState, Param
from spmdnnx.spmd._mesh import AXES
from spmdnnx.spmd._resolve import leaf_axes, leaf_shape
from spmdnnx.spmd._rules import AxisRules
from spmdnnx.train import _config
from spmdnnx.train import _step

#: Logical axes of the token batch (the runtime's loop places batches so).
BATCH_AXES = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One candidate: mesh degrees per level, microbatches and remat policy.

  Attributes:
    ici: degree of each axis of `AXES` within a host.
    dcn: degree of each axis across hosts.
    microbatches: gradient-accumulation steps per update.
    remat: the model's remat policy.
  """

  ici: tuple[int, ...]
  dcn: tuple[int, ...]
  microbatches: int
  remat: str

  @property
  def degrees(self) -> dict[str, int]:
    """Total degree of every axis (``ici * dcn``)."""
    return {a: i * d for a, i, d in zip(AXES, self.ici, self.dcn)}

  @property
  def name(self) -> str:
    """``"data=2,fsdp=32,tensor=8"`` (axes of degree 1 left out)."""
    return ",".join(f"{a}={n}" for a, n in self.degrees.items() if n > 1) or "1 device"

  def mesh_flags(self) -> dict[str, str]:
    """The run-config fields that select this layout (``mesh``, ``mesh_dcn``)."""
    fmt = lambda ds: ",".join(f"{a}={n}" for a, n in zip(AXES, ds) if n > 1)
    return {"mesh": fmt(self.ici) or "data=1", "mesh_dcn": fmt(self.dcn)}

  def config(self, cfg: Any, *, flat: bool = False) -> Any:
    """A copy of the run config ``cfg`` set to this layout.

    Args:
      cfg: a run ConfigDict.
      flat: put every degree in ``mesh`` (one process holding all devices, as
        the planner's compile subprocess does).
    """
    out = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    if flat:
      out.mesh = ",".join(f"{a}={n}" for a, n in self.degrees.items() if n > 1) or "data=1"
      out.mesh_dcn = ""
    else:
      out.update(self.mesh_flags())
    out.microbatches = self.microbatches
    out.model.remat = self.remat
    return out


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
  """Every k-tuple of positive ints whose product is n."""
  if k == 1:
    return [(n,)]
  out = []
  for d in range(1, n + 1):
    if n % d == 0:
      out.extend((d,) + rest for rest in _factorizations(n // d, k - 1))
  return out


def split_levels(degrees: Sequence[int], devices_per_host: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """Splits total degrees (over `AXES`) into (within-host, across-host) parts.

  The innermost axes (``tensor`` first) take the host's devices; None when
  the degrees cannot fill a host exactly.

  >>> split_levels((4, 1, 16, 1, 1, 8), 8)
  ((1, 1, 1, 1, 1, 8), (4, 1, 16, 1, 1, 1))
  """
  remaining = devices_per_host
  ici = [1] * len(AXES)
  for i in reversed(range(len(AXES))):
    ici[i] = math.gcd(degrees[i], remaining)
    remaining //= ici[i]
  if remaining != 1:
    return None
  return tuple(ici), tuple(d // i for d, i in zip(degrees, ici))


def allowed_axes(rules: AxisRules, groups: dict) -> tuple[str, ...]:
  """Mesh axes the rules map a logical axis of the parameters or the batch to.

  Any other axis would only replicate work (e.g. ``expert`` for a dense
  model), so layouts never use it.
  """
  names = set(BATCH_AXES)
  for _, var in groups["params"]:
    names.update(a for a in (leaf_axes(var) or ()) if a is not None)
  used = set()
  for name, axes in rules:
    if name in names and axes is not None:
      used.update((axes,) if isinstance(axes, str) else axes)
  return tuple(a for a in AXES if a in used)


def abstract_state(model_cfg: models.LMConfig, cfg: Any) -> Any:
  """The run's `Optimizer` (model inside) with abstract values.

  Built by `eval_shape` from the runtime's own constructors
  (`models.build_model`, `make_optimizer`, `Optimizer`): no array is
  allocated, so 70B parameters cost nothing.
  """
  tx, _ = _step.make_optimizer(
      learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay,
      b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, grad_clip=cfg.grad_clip)

  def build():
    model = models.build_model(model_cfg, rngs=Rngs(cfg.seed))
    return Optimizer(model, tx, wrt=Param)

  return eval_shape(build)


def _leaves(state: Any) -> list[tuple[tuple, Any]]:
  return list(state.flat_state())


def variable_groups(optimizer: Any) -> dict[str, list[tuple[tuple, Any]]]:
  """``{"params": ..., "opt_state": ..., "other": ...}`` (path, Variable) lists."""
  params = _leaves(graph_state(optimizer.model, Param))
  everything = _leaves(graph_state(optimizer.model))
  other = [(p, v) for p, v in everything if not isinstance(v, Param)]
  return {"params": params, "opt_state": _leaves(graph_state(optimizer, OptState)),
          "other": other}


def shard_bytes(shape: Sequence[int], itemsize: int, spec: Any,
                mesh_shape: dict[str, int]) -> int:
  """Bytes one device holds of an array laid out by ``spec`` (even split)."""
  n = itemsize
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  for dim, entry in zip(shape, entries):
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    ways = math.prod(mesh_shape[a] for a in axes)
    n *= -(-dim // ways)
  return n


def state_bytes(groups: dict, rules: AxisRules, mesh_shape: dict[str, int]
                ) -> tuple[dict[str, int], list[str]]:
  """Per-device bytes of each group, and the dimensions the rules could not divide.

  Returns:
    ``({group: bytes}, [undivided descriptions])``.
  """
  out: dict[str, int] = {}
  undivided: list[str] = []
  for group, leaves in groups.items():
    total = 0
    for path, var in leaves:
      shape, axes = leaf_shape(var), leaf_axes(var)
      itemsize = var.raw_value.dtype.itemsize
      if axes is None or not shape:
        total += math.prod(shape or ()) * itemsize
        continue
      res = rules.resolve_detailed(axes, shape, mesh_shape)
      if group == "params":
        for i, name, size, tried in res.undivided:
          ways = ", ".join(f"{a}:{w}" for a, w in tried)
          undivided.append(f"{'/'.join(map(str, path))} dim {i} ({name}={size}) by {ways}")
      total += shard_bytes(shape, itemsize, res.spec, mesh_shape)
    out[group] = total
  return out, undivided


def batch_spec(rules: AxisRules, cfg: Any, mesh_shape: dict[str, int]) -> Any:
  """PartitionSpec of the ``[batch_size, seq_len]`` token arrays."""
  return rules.resolve_detailed(BATCH_AXES, (cfg.batch_size, cfg.seq_len), mesh_shape).spec


def _choices(values: Sequence[Any] | None, default: Any) -> tuple:
  if not values:
    return (default,)
  return tuple(dict.fromkeys(values))


def enumerate_layouts(cfg: Any, *, devices: int, devices_per_host: int = 8,
                      microbatches: Sequence[int] | None = None,
                      remat: Sequence[str] | None = None,
                      groups: dict | None = None
                      ) -> tuple[list[Layout], list[tuple[str, str]]]:
  """Candidate layouts of ``cfg`` on ``devices`` devices, and the rejected ones.

  Args:
    cfg: a run config (the rules preset, batch, microbatches and model).
    devices: total device count.
    devices_per_host: devices of one host (NVLink / ICI domain); a count
      below it is one host.
    microbatches: gradient-accumulation choices (default: the config's).
    remat: remat policy choices (default: the config's).
    groups: `variable_groups` of the abstract state (built if None).

  Returns:
    ``(layouts, [(layout name, why rejected), ...])``.

  Raises:
    MeshError: for a device count below 1 or not a whole number of hosts.
  """
  if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
    raise errors.MeshError(f"--devices={devices!r}: give a positive device count.",
                           count=devices)
  if isinstance(devices_per_host, bool) or not isinstance(devices_per_host, int) \
      or devices_per_host < 1:
    raise errors.MeshError(
        f"--devices_per_host={devices_per_host!r}: give a positive count.",
        count=devices_per_host)
  per_host = min(devices_per_host, devices)
  if devices % per_host:
    raise errors.MeshError(
        f"{devices} devices are not a whole number of hosts of {per_host} devices; use a "
        f"multiple of {per_host} (e.g. {devices - devices % per_host} or "
        f"{devices + per_host - devices % per_host}), or set --devices_per_host.",
        count=devices, devices_per_host=per_host)
  hosts = devices // per_host
  rules = AxisRules.load(cfg.rules) if isinstance(cfg.rules, str) else cfg.rules
  if groups is None:
    groups = variable_groups(abstract_state(models.LMConfig.from_mapping(cfg.model), cfg))
  pipelined = cfg.get("pipeline_microbatches", 0) > 0
  # A pipelined run may put its layers on `stage` (the runtime's pipeline_rules).
  axes = allowed_axes(_config.pipeline_rules(rules, pipelined), groups)
  mb_choices = _choices(microbatches, cfg.microbatches)
  remat_choices = _choices(remat, cfg.model.remat)
  layouts: list[Layout] = []
  skipped: list[tuple[str, str]] = []
  for combo in _factorizations(devices, len(axes)):
    degrees = tuple(combo[axes.index(a)] if a in axes else 1 for a in AXES)
    name = ",".join(f"{a}={n}" for a, n in zip(AXES, degrees) if n > 1) or "1 device"
    split = split_levels(degrees, per_host)
    if split is None:
      skipped.append((name, f"the degrees cannot fill hosts of {per_host} devices"))
      continue
    ici, dcn = split
    if dcn[AXES.index("tensor")] > 1:
      skipped.append((name, f"tensor={degrees[-1]} would cross hosts of {per_host} devices"))
      continue
    mesh_shape = dict(zip(AXES, degrees))
    layout_rules = _config.pipeline_rules(rules, pipelined and mesh_shape["stage"] > 1)
    _, undivided = state_bytes({"params": groups["params"]}, layout_rules, mesh_shape)
    if undivided:
      skipped.append((name, "the rules cannot divide " + errors.format_paths(undivided, 3)))
      continue
    for mb, rm in itertools.product(mb_choices, remat_choices):
      layout = Layout(ici, dcn, int(mb), str(rm))
      label = f"{name} mb={mb} remat={rm}"
      try:
        _config.validate(layout.config(cfg), num_devices=devices, process_count=hosts)
      except (errors.ConfigError, errors.MeshError, errors.AxisRulesError) as e:
        skipped.append((label, str(e)))
        continue
      layouts.append(layout)
  return layouts, skipped


def device_of_host(layout: Layout) -> list[int]:
  """Host index of each position of the flat mesh (`AXES` order, row-major).

  Along each axis the across-host part is the outer one (as
  `make_mesh` lays out a hybrid mesh), so position ``c`` on an axis is on
  host-coordinate ``c // ici``.

  >>> device_of_host(Layout((1, 1, 1, 1, 1, 2), (2, 1, 1, 1, 1, 1), 1, "none"))
  [0, 0, 1, 1]
  """
  sizes = [i * d for i, d in zip(layout.ici, layout.dcn)]
  hosts = []
  for coords in itertools.product(*(range(s) for s in sizes)):
    host = 0
    for c, i, d in zip(coords, layout.ici, layout.dcn):
      host = host * d + c // i
    hosts.append(host)
  return hosts
