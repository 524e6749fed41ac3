"""`plan_layouts`: size and rank the mesh layouts of a run on N devices.

For every candidate layout (`enumerate_layouts`) the planner reports, per
device:

* exact bytes of parameters, optimizer state, gradients and the token batch,
  from the abstract model and optimizer (`abstract_state`) and the rules;
* an activation estimate (see docs/planning.md) and whether the total fits
  the device's HBM;
* with ``compile=True`` (default), XLA's argument / output / temporary bytes
  and the collectives and dot FLOPs of the real train step compiled for N
  fake CPU devices in a subprocess (`compile_in_subprocess`); without it, an
  analytic estimate of the collective bytes (`estimate_comm`);
* the roofline step time, tokens/s and MFU on the chosen device kind
  (`DEVICE_KINDS`), with the pipeline bubble for stage layouts.

Layouts that fit come first, fastest first; the others follow, ranked the
same way.

>>> from spmdnnx.train._config import base_config
>>> plan = plan_layouts(base_config(), devices=8, compile=False, log=None)
>>> plan.layouts[0].fits, len(plan.layouts) >= 4
(True, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Sequence

from spmdnnx import errors
from spmdnnx import models
from spmdnnx.spmd._rules import AxisRules
from spmdnnx.train import _config
from spmdnnx.train import _hlo
from spmdnnx.train import _plan_compile
from spmdnnx.train import _plan_layouts as layouts_lib
from spmdnnx.train import _roofline

#: Share of HBM a layout may fill (the rest: allocator, XLA workspace, fragmentation).
HBM_USABLE = 0.9
_GB = 1e9


@dataclasses.dataclass
class LayoutPlan:
  """The planner's numbers for one layout (bytes and FLOPs are per device).

  Attributes:
    layout: the `Layout`.
    name: ``"data=2,fsdp=32,tensor=8"``.
    params_bytes, opt_state_bytes, grads_bytes, batch_bytes: exact, from the
      shardings.
    other_bytes: other model Variables (exact).
    activation_bytes: estimate (docs/planning.md).
    total_bytes: the sum of the above.
    fits: ``total_bytes <= HBM_USABLE * hbm``.
    comm_estimate: analytic wire bytes per step, ``{"within_host",
      "across_hosts", "by_kind"}``.
    compiled: the compile subprocess's result (None without compilation).
    flops: FLOPs per device per step used for the estimate.
    estimate: the `StepEstimate`.
    tokens_per_s, mfu: from the estimate.
  """

  layout: layouts_lib.Layout
  name: str
  params_bytes: int
  opt_state_bytes: int
  grads_bytes: int
  batch_bytes: int
  other_bytes: int
  activation_bytes: int
  total_bytes: int
  fits: bool
  comm_estimate: dict
  compiled: dict | None = None
  flops: float = 0.0
  estimate: _roofline.StepEstimate | None = None
  tokens_per_s: float = 0.0
  mfu: float = 0.0

  @property
  def comm_bytes(self) -> float:
    """Collective wire bytes per step: measured in the HLO if compiled, else estimated."""
    if self.compiled and "hlo" in self.compiled:
      return self.compiled["hlo"]["bytes_within_host"] + \
          self.compiled["hlo"]["bytes_across_hosts"]
    return self.comm_estimate["within_host"] + self.comm_estimate["across_hosts"]

  def to_dict(self) -> dict:
    """JSON-able form: every field, the layout's degrees and run-config flags."""
    out = dataclasses.asdict(self)
    out["layout"] = {"degrees": self.layout.degrees, "microbatches": self.layout.microbatches,
                     "remat": self.layout.remat, **self.layout.mesh_flags()}
    out["comm_bytes"] = self.comm_bytes
    return out


@dataclasses.dataclass
class Plan:
  """The ranked layouts of one planning run.

  Attributes:
    devices, devices_per_host: the device set planned for.
    device: the `DeviceKind`.
    layouts: `LayoutPlan`s, best first (fitting ones before the others).
    skipped: ``(layout, reason)`` for every rejected candidate.
    seconds: wall time of the planning.
    model_flops_per_token: training FLOPs per token (for MFU).
    tokens_per_step: ``batch_size * seq_len``.
  """

  devices: int
  devices_per_host: int
  device: _roofline.DeviceKind
  layouts: list
  skipped: list
  seconds: float = 0.0
  model_flops_per_token: float = 0.0
  tokens_per_step: int = 0

  def table(self, top: int | None = None) -> str:
    """The ranked table as text (columns explained in docs/planning.md)."""
    return format_table(self, top)

  def to_json(self) -> str:
    """Every layout's numbers and every rejection, as JSON text."""
    return json.dumps({
        "devices": self.devices, "devices_per_host": self.devices_per_host,
        "device": dataclasses.asdict(self.device), "seconds": self.seconds,
        "model_flops_per_token": self.model_flops_per_token,
        "tokens_per_step": self.tokens_per_step,
        "layouts": [p.to_dict() for p in self.layouts],
        "skipped": [{"layout": n, "reason": r} for n, r in self.skipped]}, indent=1,
        default=str)

  def raise_if_none_fits(self) -> None:
    """Raises ConfigError when no layout fits in HBM, saying by how much and what would.

    Raises:
      ConfigError: naming the closest layout, its excess and the remedies.
    """
    if any(p.fits for p in self.layouts) or not self.layouts:
      return
    usable = HBM_USABLE * self.device.hbm_bytes
    best = min(self.layouts, key=lambda p: p.total_bytes)
    over = best.total_bytes - usable
    state = best.params_bytes + best.opt_state_bytes + best.grads_bytes
    hints = []
    if state < usable:
      if best.layout.remat != "full":
        hints.append("remat='full' (--config.model.remat=full or --remat=full)")
      hints.append(f"more microbatches (--microbatches={best.layout.microbatches * 2} or "
                   "more: smaller microbatches hold fewer activations)")
    need = math.ceil(self.devices * state / max(usable - best.activation_bytes, 1))
    need = max(need, self.devices + 1)
    hints.append(f"more devices (parameters, gradients and optimizer state alone need "
                 f"about {_fmt_gb(state * self.devices)} in all: at least ~{need} "
                 f"{self.device.name} devices)")
    raise errors.ConfigError(
        f"The model fits on no layout of {self.devices} {self.device.name} devices: the "
        f"smallest, {best.name} (microbatches={best.layout.microbatches}, "
        f"remat={best.layout.remat}), needs {_fmt_gb(best.total_bytes)} per device "
        f"({_fmt_gb(state)} state + {_fmt_gb(best.activation_bytes)} activations) but "
        f"{_fmt_gb(usable)} is usable ({HBM_USABLE:.0%} of {_fmt_gb(self.device.hbm_bytes)}): "
        f"{_fmt_gb(over)} over. Try: {'; '.join(hints)}.",
        over_bytes=over, layout=best.name, devices=self.devices, device=self.device.name)


def _fmt_gb(n: float) -> str:
  return f"{n / _GB:.2f} GB" if n < 100 * _GB else f"{n / _GB:.0f} GB"


# --- analytic estimates --------------------------------------------------------------

def _local_batch(cfg: Any, layout: layouts_lib.Layout) -> tuple[float, float]:
  """(sequences per device per microbatch, tokens per sequence per device)."""
  g = layout.degrees
  b = cfg.batch_size / layout.microbatches / max(g["data"] * g["fsdp"], 1)
  return b, cfg.seq_len / g["sequence"]


def _pipelined(cfg: Any, layout: layouts_lib.Layout) -> bool:
  return layout.degrees["stage"] > 1 and cfg.get("pipeline_microbatches", 0) > 0


def activation_bytes(model: models.LMConfig, cfg: Any, layout: layouts_lib.Layout) -> int:
  """Estimated activation bytes one device holds at the peak of a step.

  Per block (after Korthikanti et al., 2022, with ``t`` tensor ways):
  ``s*b*d*(5 + 12/t)`` elements plus ``2.5*heads*s^2*b/t`` for the attention
  scores. remat ``none`` keeps every block's; ``full`` keeps each block's
  input and one block's full set; other policies are taken as half of
  ``none``. The float32 logits and their gradient (3 copies of
  ``b*s*vocab/t``) come on top.
  """
  g = layout.degrees
  t = g["tensor"]
  b, s = _local_batch(cfg, layout)
  a = model.jnp_dtype.itemsize
  layers = model.num_layers / (g["stage"] if _pipelined(cfg, layout) else 1)
  block = s * b * model.embed_dim * (5 + 12 / t) * a
  if model.kind == "llama":
    block += 2.5 * model.num_heads * s * cfg.seq_len * b / t * a
  if layout.remat == "none":
    acts = layers * block
  elif layout.remat == "full":
    acts = layers * s * b * model.embed_dim * a + block
  else:
    acts = 0.5 * layers * block
  logits = 3 * b * s * model.vocab_size / t * 4
  return int(acts + logits)


def estimate_comm(model: models.LMConfig, cfg: Any, layout: layouts_lib.Layout,
                  param_bytes_total: int) -> dict:
  """Analytic collective wire bytes per device per step (no compilation).

  Per microbatch: fsdp (and stage, without pipelining) all-gathers the
  weights once per pass (2 passes, 3 with remat) and reduce-scatters their
  gradients; data all-reduces the gradient shards; tensor all-reduces the
  residual stream after attention and MLP in every forward pass and the input
  gradients of q, k, v, gate and up in the backward pass (plus embedding and
  logits);
  sequence all-gathers keys and values per block and pass; a pipeline passes
  activations between stages. Ring costs as in `analyze_hlo`.

  Returns:
    ``{"within_host", "across_hosts", "by_kind"}`` in bytes.
  """
  g, dcn = layout.degrees, dict(zip(layouts_lib.AXES, layout.dcn))
  t = g["tensor"]
  passes = 2 if layout.remat == "none" else 3
  pipelined = _pipelined(cfg, layout)
  shard_ways = g["fsdp"] * (1 if pipelined else g["stage"])
  gathered = param_bytes_total / t / g["expert"]
  b, s = _local_batch(cfg, layout)
  a = model.jnp_dtype.itemsize
  act = a * b * s * model.embed_dim
  ring = lambda n: (n - 1) / n
  kinds = {k: 0.0 for k in _hlo.COLLECTIVE_KINDS}
  within = across = 0.0

  def add(kind: str, nbytes: float, crosses: bool) -> None:
    nonlocal within, across
    kinds[kind] += nbytes
    if crosses:
      across += nbytes
    else:
      within += nbytes

  mb = layout.microbatches
  fsdp_cross = dcn["fsdp"] > 1 or (not pipelined and dcn["stage"] > 1)
  if shard_ways > 1:
    add("all-gather", mb * passes * gathered * ring(shard_ways), fsdp_cross)
    add("reduce-scatter", mb * gathered * ring(shard_ways), fsdp_cross)
  if g["data"] > 1:
    add("all-reduce", mb * 2 * gathered / shard_ways * ring(g["data"]), dcn["data"] > 1)
  layers = model.num_layers / (g["stage"] if pipelined else 1)
  if t > 1:
    # Forward (again under remat): the attention and MLP outputs; backward:
    # the input gradients of q, k, v, gate and up, each reduced on its own.
    forward, backward = (2, 5) if model.kind == "llama" else (1, 2)
    count = layers * (forward * (passes - 1) + backward) + 2
    add("all-reduce", mb * count * 2 * act * ring(t), False)
  if g["sequence"] > 1 and model.kind == "llama":
    kv = 2 * a * b * cfg.seq_len * model.num_kv_heads * model.head_dim / t
    add("all-gather", mb * layers * passes * kv * ring(g["sequence"]), dcn["sequence"] > 1)
  if pipelined:
    add("collective-permute", 2 * cfg.batch_size / max(g["data"] * g["fsdp"], 1)
        * s * model.embed_dim * a, dcn["stage"] > 1)
  return {"within_host": within, "across_hosts": across, "by_kind": kinds}


def _model_flops_per_device(model: models.LMConfig, cfg: Any,
                            layout: layouts_lib.Layout) -> float:
  """Hardware FLOPs per device (remat recomputation included, duplicated work counted)."""
  g = layout.degrees
  total = models.flops_per_token(model, cfg.seq_len) * cfg.batch_size * cfg.seq_len
  split = g["data"] * g["fsdp"] * g["tensor"] * g["sequence"]
  if _pipelined(cfg, layout):
    split *= g["stage"]
  recompute = 4 / 3 if layout.remat == "full" else 1.0
  return total * recompute / split


def _hbm_traffic(plan: LayoutPlan, param_bytes_total: int) -> float:
  passes = 2 if plan.layout.remat == "none" else 3
  weights = plan.layout.microbatches * passes * param_bytes_total / \
      plan.layout.degrees["tensor"]
  return weights + 2 * plan.params_bytes + plan.grads_bytes + 2 * plan.opt_state_bytes + \
      2 * plan.activation_bytes


# --- planning -------------------------------------------------------------------------

def _size(model: models.LMConfig, cfg: Any, layout: layouts_lib.Layout, groups: dict,
          rules: AxisRules, usable: float, param_total: int) -> LayoutPlan:
  mesh_shape = layout.degrees
  rules = _config.pipeline_rules(rules, _pipelined(cfg, layout))
  sizes, _ = layouts_lib.state_bytes(groups, rules, mesh_shape)
  spec = layouts_lib.batch_spec(rules, cfg, mesh_shape)
  batch = 2 * layouts_lib.shard_bytes((cfg.batch_size, cfg.seq_len), 4, spec, mesh_shape)
  grads = sizes["params"] * (2 if layout.microbatches > 1 else 1)
  acts = activation_bytes(model, cfg, layout)
  total = sizes["params"] + sizes["opt_state"] + grads + batch + sizes["other"] + acts
  return LayoutPlan(layout, layout.name, sizes["params"], sizes["opt_state"], grads, batch,
                    sizes["other"], acts, total, total <= usable,
                    estimate_comm(model, cfg, layout, param_total))


def _finish(p: LayoutPlan, model: models.LMConfig, cfg: Any, kind: _roofline.DeviceKind,
            devices: int, param_total: int) -> None:
  hlo = (p.compiled or {}).get("hlo")
  p.flops = hlo["dot_flops"] if hlo and hlo["dot_flops"] > 0 else \
      _model_flops_per_device(model, cfg, p.layout)
  within = hlo["bytes_within_host"] if hlo else p.comm_estimate["within_host"]
  across = hlo["bytes_across_hosts"] if hlo else p.comm_estimate["across_hosts"]
  bubble = 0.0
  if _pipelined(cfg, p.layout):
    bubble = _roofline.bubble_fraction(p.layout.degrees["stage"],
                                       cfg.get("pipeline_microbatches", 0),
                                       cfg.get("pipeline_repeats", 1))
  p.estimate = _roofline.estimate_step(kind, flops=p.flops, hbm_bytes=_hbm_traffic(
      p, param_total), bytes_within_host=within, bytes_across_hosts=across, bubble=bubble)
  tokens = cfg.batch_size * cfg.seq_len
  p.tokens_per_s = tokens / p.estimate.step_s
  p.mfu = models.flops_per_token(model, cfg.seq_len) * p.tokens_per_s / \
      (devices * kind.peak_flops)


def plan_layouts(cfg: Any, *, devices: int, devices_per_host: int = 8, device: str = "h100",
                 compile: bool = True, microbatches: Sequence[int] | None = None,
                 remat: Sequence[str] | None = None, workers: int = 2,
                 log: Callable[[str], None] | None = print) -> Plan:
  """Sizes and ranks every usable layout of run config ``cfg`` on ``devices`` devices.

  Args:
    cfg: a run config (`base_config`, ``configs/*.py``).
    devices: devices of the planned job (none need exist here).
    devices_per_host: devices sharing a host's fast links.
    device: a `DEVICE_KINDS` name.
    compile: compile each layout's real train step for ``devices`` fake CPU
      devices in a subprocess (collectives, FLOPs and XLA memory from the
      program); False answers from the analytic model in seconds.
    microbatches: gradient-accumulation choices (default: the config's).
    remat: remat policy choices (default: the config's).
    workers: compile subprocesses running at once.
    log: receives a progress line per layout (None: quiet).

  Returns:
    A `Plan`.

  Raises:
    ConfigError: unknown device kind or invalid config.
    MeshError: a device count that no layout can use (every reason listed).
  """
  t0 = time.perf_counter()
  say = log or (lambda _: None)
  kind = _roofline.get_device_kind(device)
  model = models.LMConfig.from_mapping(cfg.model)
  rules = AxisRules.load(cfg.rules) if isinstance(cfg.rules, str) else cfg.rules
  groups = layouts_lib.variable_groups(layouts_lib.abstract_state(model, cfg))
  candidates, skipped = layouts_lib.enumerate_layouts(
      cfg, devices=devices, devices_per_host=devices_per_host, microbatches=microbatches,
      remat=remat, groups=groups)
  if not candidates:
    raise errors.MeshError(
        f"No layout of {devices} devices ({min(devices_per_host, devices)} per host) can run "
        f"this config: "
        f"{errors.format_paths([f'{n}: {r}' for n, r in skipped], 6)}. Choose a device "
        "count whose factors divide the model's dimensions and batch_size / microbatches "
        "(e.g. a power of two), or change batch_size / microbatches.",
        count=devices, reasons=[r for _, r in skipped])
  param_total = sum(math.prod(v.raw_value.shape) * v.raw_value.dtype.itemsize
                    for _, v in groups["params"])
  usable = HBM_USABLE * kind.hbm_bytes
  plans = [_size(model, cfg, layout, groups, rules, usable, param_total)
           for layout in candidates]
  n = len(plans)
  if compile:
    say(f"compiling the train step of {n} layouts for {devices} fake CPU devices "
        f"({min(workers, n)} subprocess(es))")
    started = {}
    results = _plan_compile.compile_in_subprocess(
        cfg, candidates, devices, workers=workers, on_start=lambda i: started.__setitem__(i, time.perf_counter()))
    for done, (i, result) in enumerate(results, 1):
      plans[i].compiled = result
      _finish(plans[i], model, cfg, kind, devices, param_total)
      say(_progress(done, n, plans[i], time.perf_counter() - started.get(i, t0)))
  else:
    for done, p in enumerate(plans, 1):
      _finish(p, model, cfg, kind, devices, param_total)
      say(_progress(done, n, p, None))
  plans.sort(key=lambda p: (not p.fits, "error" in (p.compiled or {}), p.estimate.step_s))
  return Plan(devices, min(devices_per_host, devices), kind, plans, skipped,
              time.perf_counter() - t0, models.flops_per_token(model, cfg.seq_len),
              cfg.batch_size * cfg.seq_len)


def _progress(done: int, n: int, p: LayoutPlan, seconds: float | None) -> str:
  head = f"[{done}/{n}] {p.name} mb={p.layout.microbatches} remat={p.layout.remat}:"
  if p.compiled and "error" in p.compiled:
    return f"{head} compile failed: {p.compiled['error'][:300]}"
  how = f"compiled in {seconds:.1f} s, " if seconds is not None else ""
  return (f"{head} {how}{_fmt_gb(p.total_bytes)}/device "
          f"({'fits' if p.fits else 'DOES NOT FIT'}), collectives {_fmt_gb(p.comm_bytes)}/step, "
          f"est. step {p.estimate.step_s:.2f} s, MFU {p.mfu:.1%}")


_COLUMNS = ("#", "layout", "mb", "remat", "params", "opt", "grads", "batch", "act~",
            "total", "fit", "xla tmp", "AG", "RS", "AR", "A2A", "CP", "comm s", "step s",
            "tok/s", "MFU", "bubble")


def format_table(plan: Plan, top: int | None = None) -> str:
  """Text table of ``plan`` (GB per device; collectives in GB per step)."""
  rows = []
  for rank, p in enumerate(plan.layouts[:top] if top else plan.layouts, 1):
    hlo = (p.compiled or {}).get("hlo")
    kinds = hlo["bytes_by_kind"] if hlo else p.comm_estimate["by_kind"]
    gb = lambda x: f"{x / _GB:.2f}"
    tmp = gb(p.compiled["temp_bytes"]) if p.compiled and "temp_bytes" in p.compiled else "-"
    failed = bool(p.compiled and "error" in p.compiled)
    rows.append((str(rank), p.name, str(p.layout.microbatches), p.layout.remat,
                 gb(p.params_bytes), gb(p.opt_state_bytes), gb(p.grads_bytes),
                 gb(p.batch_bytes), gb(p.activation_bytes), gb(p.total_bytes),
                 "yes" if p.fits else "NO", "error" if failed else tmp,
                 *(gb(kinds[k]) for k in _hlo.COLLECTIVE_KINDS),
                 f"{p.estimate.comm_s:.2f}", f"{p.estimate.step_s:.2f}",
                 f"{p.tokens_per_s:,.0f}", f"{p.mfu:.1%}", f"{p.estimate.bubble:.1%}"))
  widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
            for i, c in enumerate(_COLUMNS)]
  line = lambda cells: "  ".join(c.rjust(w) if i not in (1, 3) else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  source = "compiled HLO" if any(p.compiled for p in plan.layouts) else "analytic estimate"
  head = (f"{len(plan.layouts)} layouts of {plan.devices} x {plan.device.name} "
          f"({plan.devices_per_host} per host); GB per device, collectives in GB per "
          f"step ({source}); {len(plan.skipped)} candidates rejected")
  return "\n".join([head, line(_COLUMNS), *(line(r) for r in rows)])
