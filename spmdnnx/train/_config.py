"""Run configs: the schema of a training run, defaults, and validation.

A run config is an ``ml_collections.ConfigDict``. `base_config` gives every
field with its default; the files in ``configs/`` start from it, set a
``model`` sub-config (the fields of `spmdnnx.models.LMConfig`, from
`model_config`) and change what they need. On the command line any field can
be overridden: ``--config.steps=50 --config.data.path='~/text/*.txt'``.

`validate` checks a config against the devices, the axis rules and the data
*before anything is compiled*, and returns a `RunPlan`. Each kind of mistake
has one clear error: `ConfigError` for unknown fields and bad values (all
listed at once), `MeshError` for a mesh that does not fit the devices,
`DataError` for a data glob matching nothing.

>>> cfg = base_config()
>>> cfg.steps, cfg.mesh, cfg.data.path
(300, 'fsdp=-1,tensor=2', '')
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

import ml_collections

from spmdnnx import errors
from spmdnnx import models
from spmdnnx._pipeline import layout_problem
from spmdnnx._pipeline import schedule_problem
from spmdnnx.spmd._mesh import MeshConfig
from spmdnnx.spmd._rules import AxisRules

_RUN_FIELDS: dict[str, Any] = dict(
    steps=300,                  # optimizer updates
    batch_size=16,              # global, in sequences
    seq_len=128,                # tokens per sequence
    microbatches=1,             # gradient accumulation steps per update
    pipeline_microbatches=0,    # >0: run the layers as a pipeline over the stage mesh axis
    pipeline_repeats=1,         # rounds of layer chunks over the stages (circular pipeline)
    learning_rate=3e-3,         # peak learning rate
    warmup_steps=20,            # linear warmup, then cosine decay to min_lr_ratio
    min_lr_ratio=0.1,
    weight_decay=0.1,           # AdamW (matrices and embeddings only, not norms/biases)
    adam_b1=0.9,
    adam_b2=0.95,
    adam_eps=1e-8,
    grad_clip=1.0,              # global-norm clipping (0 disables)
    z_loss=1e-4,                # weight of the log-partition-function penalty
    mesh="fsdp=-1,tensor=2",    # parallelism degrees within a process (ici)
    mesh_dcn="",                # degrees across processes/slices, e.g. "data=2"
    rules="fsdp_tp",            # axis-rule preset in configs/rules, or a JSON path
    seed=0,                     # parameters and data order
    log_every=10,
    eval_every=100,             # 0: only at the end
    eval_batches=4,
    checkpoint_every=100,       # 0: only at the end
    max_to_keep=3,
    async_checkpoint=True,
    max_in_flight=2,            # steps dispatched but not finished
    profile_steps="",           # "first,last": jax.profiler trace of those steps
)

_DATA_FIELDS: dict[str, Any] = dict(
    path="",                    # glob of text files; empty: Python's stdlib sources
    eval_fraction=0.05,         # share of files held out (by hash of their path)
    prefetch=2,                 # batches read ahead in a background thread
)


def base_config() -> ml_collections.ConfigDict:
  """Every run field with its default; ``model`` is `model_config("lm_tiny")`."""
  cfg = ml_collections.ConfigDict(dict(_RUN_FIELDS))
  cfg.data = ml_collections.ConfigDict(dict(_DATA_FIELDS))
  cfg.model = model_config("lm_tiny")
  return cfg


def model_config(preset: str, **changes: Any) -> ml_collections.ConfigDict:
  """A ``model`` sub-config: the fields of ``models.PRESETS[preset]``.

  Raises:
    ConfigError: for an unknown preset.
  """
  if preset not in models.PRESETS:
    raise errors.ConfigError(
        f"Unknown model preset {preset!r}; presets: {', '.join(sorted(models.PRESETS))}.",
        keys=[preset])
  fields = dataclasses.asdict(models.PRESETS[preset].replace(**changes))
  return ml_collections.ConfigDict(fields)


def parse_degrees(text: str, *, field: str = "mesh") -> dict[str, int]:
  """``"fsdp=-1,tensor=2"`` -> ``{"fsdp": -1, "tensor": 2}``.

  Raises:
    ConfigError: for an entry that is not ``name=integer``.
  """
  degrees = {}
  for part in filter(None, (p.strip() for p in str(text).split(","))):
    name, _, value = part.partition("=")
    try:
      degrees[name.strip()] = int(value)
    except ValueError:
      raise errors.ConfigError(
          f"{field}: entry {part!r} must look like name=degree, e.g. "
          "'fsdp=-1,tensor=2'.", keys=[field]) from None
  return degrees


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A validated run: what `validate` derived from the config.

  Attributes:
    mesh_config: the `MeshConfig` of ``mesh`` / ``mesh_dcn``.
    mesh_shape: ``{axis: size}`` over all devices.
    rules: the loaded `AxisRules`.
    model: the `models.LMConfig`.
    batch_ways: mesh ways the batch dimension is split over.
    process_count: processes reading data.
  """

  mesh_config: MeshConfig
  mesh_shape: dict
  rules: AxisRules
  model: Any
  batch_ways: int
  process_count: int


def _known_fields() -> dict[str, set[str]]:
  return {"": set(_RUN_FIELDS) | {"data", "model"}, "data": set(_DATA_FIELDS),
          "model": {f.name for f in dataclasses.fields(models.LMConfig)}}


def _unknown_fields(cfg: Mapping[str, Any]) -> list[str]:
  known = _known_fields()
  bad = []
  for section, names in known.items():
    node = cfg if not section else cfg.get(section, {})
    if not isinstance(node, Mapping) and not hasattr(node, "keys"):
      bad.append(f"{section} (must be a sub-config)")
      continue
    for key in node.keys():
      if key not in names:
        full = f"{section}.{key}" if section else key
        close = difflib.get_close_matches(key, sorted(names), n=1)
        bad.append(full + (f" (did you mean {close[0]!r}?)" if close else ""))
  for section in ("data", "model"):
    if section not in cfg:
      bad.append(f"{section} (missing sub-config)")
  return bad


def _first_ways(rules: AxisRules, names: tuple[str, ...], mesh_shape: Mapping[str, int]
                ) -> tuple[int, str]:
  """Ways the first rule of the first named logical axis that has one splits over."""
  for name in names:
    options = rules.lookup(name)
    if options:
      axes = options[0]
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      return math.prod(mesh_shape.get(a, 1) for a in axes), f"{name} -> {axes or None}"
  return 1, "replicated"


def _positive(cfg: Any, problems: list[str], names: tuple[str, ...], *,
              allow_zero: bool = False) -> None:
  for name in names:
    value = cfg[name]
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
      problems.append(f"{name}={value!r} (must be an integer "
                      f"{'>= 0' if allow_zero else '> 0'})")


def validate(cfg: Any, *, num_devices: int, process_count: int = 1) -> RunPlan:
  """Checks a run config before anything is built or compiled.

  Args:
    cfg: a run ConfigDict (or a plain dict of the same shape).
    num_devices: devices of the whole run.
    process_count: processes (each reads its share of every batch).

  Returns:
    A `RunPlan`.

  Raises:
    ConfigError: unknown fields or bad values, all listed.
    MeshError: if the mesh degrees do not fit ``num_devices``.
    AxisRulesError: if the rules cannot be loaded or name absent mesh axes.
  """
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  unknown = _unknown_fields(cfg)
  if unknown:
    raise errors.ConfigError(
        f"Unknown config field(s): {errors.format_paths(unknown)}. Every run field is "
        "listed in spmdnnx.train.base_config() (and docs/training.md); model fields "
        "are those of spmdnnx.models.LMConfig.", keys=unknown)
  problems: list[str] = []
  _positive(cfg, problems, ("steps", "batch_size", "seq_len", "microbatches", "log_every",
                            "eval_batches", "max_to_keep", "max_in_flight"))
  _positive(cfg, problems, ("warmup_steps", "eval_every", "checkpoint_every",
                            "pipeline_microbatches"), allow_zero=True)
  _positive(cfg, problems, ("pipeline_repeats",))
  for name in ("learning_rate",):
    if not isinstance(cfg[name], (int, float)) or cfg[name] <= 0:
      problems.append(f"{name}={cfg[name]!r} (must be > 0)")
  for name in ("weight_decay", "grad_clip", "z_loss", "min_lr_ratio"):
    if not isinstance(cfg[name], (int, float)) or cfg[name] < 0:
      problems.append(f"{name}={cfg[name]!r} (must be >= 0)")
  frac = cfg["data"]["eval_fraction"]
  if not isinstance(frac, (int, float)) or not 0 < frac < 1:
    problems.append(f"data.eval_fraction={frac!r} (must be in (0, 1))")
  if cfg["profile_steps"]:
    try:
      first, last = (int(s) for s in str(cfg["profile_steps"]).split(","))
      if not 1 <= first <= last:
        raise ValueError
    except ValueError:
      problems.append(f"profile_steps={cfg['profile_steps']!r} (must be 'first,last' "
                      "with 1 <= first <= last)")
  model = None
  try:
    model = _with_pipeline(models.LMConfig.from_mapping(cfg["model"]), cfg, problems)
  except errors.ConfigError as e:
    problems.append(f"model: {e}")
  if problems:
    raise errors.ConfigError(
        f"Invalid config value(s): {errors.format_paths(problems)}.", keys=problems)

  ici = parse_degrees(cfg["mesh"], field="mesh")
  dcn = parse_degrees(cfg["mesh_dcn"], field="mesh_dcn")
  mesh_config = MeshConfig(ici=ici, dcn=dcn)
  mesh_shape = mesh_config.mesh_shape(num_devices, process_count)
  rules = AxisRules.load(cfg["rules"]) if isinstance(cfg["rules"], str) else cfg["rules"]
  pipelined = model is not None and model.pipeline_microbatches > 0 \
      and mesh_shape.get("stage", 1) > 1
  rules = pipeline_rules(rules, pipelined)
  rules.validate(mesh_shape)

  batch, seq_len, mb = cfg["batch_size"], cfg["seq_len"], cfg["microbatches"]
  batch_ways, batch_rule = _first_ways(rules, ("batch", "activation_batch"), mesh_shape)
  length_ways, length_rule = _first_ways(rules, ("activation_length", "length"), mesh_shape)
  if batch % mb:
    problems.append(f"batch_size={batch} is not divisible by microbatches={mb}")
  elif (batch // mb) % batch_ways:
    problems.append(
        f"batch_size={batch} / microbatches={mb} = {batch // mb} sequences per microbatch "
        f"is not divisible by the {batch_ways} ways of the batch axes ({batch_rule} on mesh "
        f"{_fmt(mesh_shape)}); use a multiple of {batch_ways * mb}")
  if batch % process_count:
    problems.append(f"batch_size={batch} is not divisible by the {process_count} processes")
  if seq_len % length_ways:
    problems.append(
        f"seq_len={seq_len} is not divisible by the {length_ways} ways the rules split "
        f"the sequence ({length_rule}); use a multiple of {length_ways}")
  if pipelined:
    _pipeline_problems(model, mesh_shape, batch // mb if batch % mb == 0 else None,
                       batch_ways, batch_rule, problems)
  if model is not None and seq_len > model.max_seq_len:
    problems.append(f"seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}")
  if problems:
    raise errors.ConfigError(
        f"Invalid config value(s): {errors.format_paths(problems)}.", keys=problems,
        axes=mesh_shape)
  return RunPlan(mesh_config, mesh_shape, rules, model, batch_ways, process_count)


def pipeline_rules(rules: AxisRules, pipelined: bool) -> AxisRules:
  """The rules a run uses: a pipelined run puts the stacked ``layers`` axis on ``stage``.

  A pipeline stage holds only its own layers, so unless the rules already map
  ``layers`` to ``stage`` first, that rule is replaced.
  """
  if pipelined and "stage" not in _axes(rules.lookup("layers")[:1]):
    return rules.override(layers="stage")
  return rules


def _axes(options: Any) -> tuple:
  out: tuple = ()
  for axes in options:
    out += () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return out


def _with_pipeline(model: Any, cfg: Mapping[str, Any], problems: list[str]) -> Any:
  """The model config with the run's ``pipeline_*`` fields (set once, at the top level)."""
  default = models.LMConfig()
  changes = {}
  for name in ("pipeline_microbatches", "pipeline_repeats"):
    run_value, model_value = cfg[name], getattr(model, name)
    if model_value != getattr(default, name) and model_value != run_value:
      problems.append(f"model.{name}={model_value!r} differs from {name}={run_value!r}; set "
                      f"it once, at the top level ({name})")
    changes[name] = run_value
  if any(not isinstance(v, int) or isinstance(v, bool) for v in changes.values()):
    return model
  return model.replace(**changes)


def _pipeline_problems(model: Any, mesh_shape: Mapping[str, int], per_step: int | None,
                       batch_ways: int, batch_rule: str, problems: list[str]) -> None:
  """Pipeline checks: layers per stage, microbatches per stage and per batch."""
  stages, micro = mesh_shape["stage"], model.pipeline_microbatches
  for p in (layout_problem(model.num_layers, stages, model.pipeline_repeats,
                           names=("model.num_layers", "pipeline_repeats")),
            schedule_problem(stages, micro, name="pipeline_microbatches")):
    if p:
      problems.append(p)
  if per_step is None:
    return
  if per_step % micro:
    problems.append(f"batch_size / microbatches = {per_step} sequences per update step is "
                    f"not divisible by pipeline_microbatches={micro}")
  elif (per_step // micro) % batch_ways:
    problems.append(
        f"{per_step} sequences / pipeline_microbatches={micro} = {per_step // micro} per "
        f"pipeline microbatch is not divisible by the {batch_ways} ways of the batch axes "
        f"({batch_rule}); use a batch_size that is a multiple of {batch_ways * micro}")


def _fmt(shape: Mapping[str, int]) -> str:
  return ",".join(f"{a}={n}" for a, n in shape.items() if n != 1) or "1 device"
