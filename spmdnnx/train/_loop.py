"""`run`: one training run from a config, in a work directory.

The loop validates the config (`validate`) and loads the data before
building anything, initialises the model sharded on the mesh (or restores the
latest checkpoint of ``workdir``), then dispatches jitted steps while keeping
at most ``max_in_flight`` of them unfinished: after each dispatch it waits for
the oldest unfinished step, checks that its loss is finite and logs it. Every
``eval_every`` steps it evaluates on the held-out batches; every
``checkpoint_every`` steps (and at the end) it saves model, optimizer and data
iterator state, only after every step up to that point finished with a finite
loss, so a checkpoint never holds a diverged state.

Hooks (`Hooks`) let launchers extend the loop without changing it:
``on_step_end(step)`` runs after each step is dispatched, and when any
``should_stop()`` returns True the loop saves a checkpoint of the current step
and returns normally (a preempted job exits 0 and resumes later).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from spmdnnx import errors
from spmdnnx import models
from spmdnnx._optim import Optimizer
from spmdnnx._rngs import Rngs
from spmdnnx._variables import Param
from spmdnnx.checkpointing import CheckpointManager
from spmdnnx.spmd._batch import global_batch_from_local
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._init import sharded_init
from spmdnnx.spmd._mesh import make_mesh
from spmdnnx.train import _config
from spmdnnx.train import _data
from spmdnnx.train import _logs
from spmdnnx.train import _metrics
from spmdnnx.train import _peaks
from spmdnnx.train import _step

#: File in the work directory holding the resolved config (JSON).
CONFIG_FILE = "config.json"
#: Sub-directory of the work directory holding the checkpoints.
CHECKPOINT_DIR = "checkpoints"
_BATCH_AXES = ("batch", "length")


@dataclasses.dataclass
class Hooks:
  """Callbacks the loop runs.

  Attributes:
    on_step_end: called with the step number after each step is dispatched.
    should_stop: predicates checked after every step; the first True makes
      the loop checkpoint the current step and return.
  """

  on_step_end: list[Callable[[int], None]] = dataclasses.field(default_factory=list)
  should_stop: list[Callable[[], bool]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunResult:
  """What `run` did.

  Attributes:
    start_step: the step the run started from (0, or the restored one).
    final_step: the last step completed.
    losses: ``{step: loss}`` of every step this call ran.
    records: every record written to ``metrics.jsonl`` by this call.
    eval: the last eval record (``eval_loss``, ``eval_bits_per_byte``) or None.
    stopped: True when a ``should_stop`` hook ended the run early.
  """

  start_step: int
  final_step: int
  losses: dict
  records: list
  eval: dict | None
  stopped: bool


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to ``workdir/config.json``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads ``workdir/config.json`` back.

  Raises:
    ConfigError: if the file does not exist.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.ConfigError(
        f"{path} does not exist: {workdir!r} is not the work directory of a training "
        "run (launch.train writes config.json there).", paths=[path])
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _profile_range(text: str) -> tuple[int, int] | None:
  if not text:
    return None
  first, last = (int(s) for s in str(text).split(","))
  return first, last


class _Run:
  """The state of one `run` call (kept out of `run` to keep it readable)."""

  def __init__(self, cfg: Any, plan: _config.RunPlan, workdir: str, hooks: Hooks,
               log: Callable[[str], None]):
    self.cfg, self.plan, self.workdir, self.hooks = cfg, plan, workdir, hooks
    self.writer = _metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0, log=log)
    self.pending: collections.deque = collections.deque()
    self.losses: dict[int, float] = {}
    self.records: list[dict] = []
    self.last_eval: dict | None = None
    self.last_saved: int | None = None
    self.timer_step = 0
    self.timer_t = time.perf_counter()
    self.window_wait = 0.0

  def reset_timer(self, step: int) -> None:
    self.timer_step, self.timer_t = step, time.perf_counter()
    self.window_wait = self.data.wait_s

  def finish_oldest(self) -> None:
    """Waits for the oldest in-flight step and checks its loss."""
    step, out = self.pending.popleft()
    out = jax.device_get(out)
    loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      self.fail(step, loss, grad_norm)
    self.losses[step] = loss
    self.last_out = (step, loss, grad_norm)

  def drain(self) -> None:
    while self.pending:
      self.finish_oldest()

  def fail(self, step: int, loss: float, grad_norm: float) -> None:
    self.pending.clear()
    self.ckpt.wait_until_finished()
    kept = (f"the last good checkpoint (step {self.last_saved}) is kept in "
            f"{self.ckpt_dir}" if self.last_saved is not None else
            "no checkpoint had been saved yet")
    raise errors.TrainingError(
        f"Non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm}); training "
        f"stopped and {kept}. Lower learning_rate, raise warmup_steps or set grad_clip, "
        "then rerun (a rerun in the same workdir resumes from that checkpoint).",
        step=step, loss=loss, grad_norm=grad_norm, last_checkpoint=self.last_saved)

  def timing(self, step: int) -> tuple[float, float]:
    """(seconds per step, share of time waiting for data) since the timer's reset."""
    elapsed = time.perf_counter() - self.timer_t
    waited = self.data.wait_s - self.window_wait
    return elapsed / max(step - self.timer_step, 1), waited / max(elapsed, 1e-9)

  def log_step(self, step: int, timing: tuple[float, float],
               eval_metrics: dict | None) -> None:
    """Writes the record of ``step`` (all steps up to it have finished)."""
    _, loss, grad_norm = self.last_out
    step_time, wait_fraction = timing
    record = {"step": step, "loss": loss,
              "learning_rate": float(self.schedule(step - 1)),
              "grad_norm": grad_norm, "step_time_s": step_time}
    record.update(self.throughput.of(step_time))
    record["data_wait_fraction"] = wait_fraction
    if eval_metrics:
      record.update(eval_metrics)
    eta = step_time * (self.cfg.steps - step)
    self.writer.write(record)
    self.records.append(record)
    line = _metrics.progress_line(record, total_steps=self.cfg.steps, eta_s=eta)
    if eval_metrics:
      line += (f" | eval loss {eval_metrics['eval_loss']:.4f}, "
               f"{eval_metrics['eval_bits_per_byte']:.3f} bits/byte")
    self.writer.text(line)

  def evaluate(self) -> dict:
    losses = [self.eval_step(self.model, b) for b in self.eval_data]
    loss = float(np.mean(jax.device_get(losses)))
    self.last_eval = {"eval_loss": loss, "eval_bits_per_byte": loss / math.log(2)}
    return self.last_eval

  def save(self, step: int) -> None:
    # The data position counts global batches, the same on every process and
    # for any process count: the global metadata keeps a copy, from which a
    # job with another process count resumes (per-process files cannot).
    saved = self.ckpt.save(step, model=self.model, optimizer=self.optimizer, data=self.data,
                           metadata={"step": step, "loss": self.losses.get(step),
                                     "data_state": self.data.get_state()},
                           force=True)
    if saved:
      self.last_saved = step


def _build(run_: _Run, mesh: Any) -> None:
  cfg, plan = run_.cfg, run_.plan
  corpus = run_.corpus
  run_.model = sharded_init(lambda: models.build_model(plan.model, rngs=Rngs(cfg.seed)))
  tx, run_.schedule = _step.make_optimizer(
      learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio,
      weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
      grad_clip=cfg.grad_clip)
  run_.optimizer = Optimizer(run_.model, tx, wrt=Param)
  pi, pc = jax.process_index(), jax.process_count()
  rules = plan.rules
  place = lambda b: global_batch_from_local(b, mesh, rules, axes=_BATCH_AXES)
  dataset = _data.train_dataset(corpus.train, global_batch=cfg.batch_size, seed=cfg.seed,
                                process_index=pi, process_count=pc)
  run_.data = _data.Prefetcher(dataset, place, depth=cfg.data.prefetch)
  run_.eval_data = [place(b) for b in _data.eval_batches(
      corpus.eval, global_batch=cfg.batch_size, num_batches=cfg.eval_batches,
      process_index=pi, process_count=pc)]
  run_.train_step = _step.make_train_step(microbatches=cfg.microbatches, z_loss=cfg.z_loss)
  run_.eval_step = _step.make_eval_step()
  run_.throughput = _metrics.Throughput(
      tokens_per_step=cfg.batch_size * cfg.seq_len,
      flops_per_token=float(models.flops_per_token(plan.model, cfg.seq_len)),
      num_devices=jax.device_count(), peak=_peaks.peak_flops_per_device())


def run(cfg: ml_collections.ConfigDict, *, workdir: str, hooks: Hooks | None = None,
        log: Callable[[str], None] = print) -> RunResult:
  """Trains the configured model in ``workdir`` (resuming from its checkpoints).

  Args:
    cfg: a run config (`base_config` and the files in ``configs/``).
    workdir: where config.json, metrics.jsonl, TensorBoard events and
      checkpoints go; if it holds checkpoints, training resumes from the
      latest one.
    hooks: `Hooks` for launchers (preemption, watchdogs).
    log: where progress lines go (process 0 only).

  Returns:
    A `RunResult`.

  Raises:
    ConfigError / MeshError / AxisRulesError / DataError: before anything is
      compiled, for a bad config or data glob.
    TrainingError: on a non-finite loss, naming the step (the last good
      checkpoint is kept).
  """
  hooks = hooks or Hooks()
  plan = _config.validate(cfg, num_devices=jax.device_count(),
                          process_count=jax.process_count())
  corpus = _data.Corpus.load(cfg.data.path, cfg.seq_len, cfg.data.eval_fraction)
  mesh = make_mesh(plan.mesh_config)
  if jax.process_index() == 0:
    save_config(cfg, workdir)
  run_ = _Run(cfg, plan, workdir, hooks, log)
  run_.corpus = corpus
  w = run_.writer
  w.text(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
         f"({jax.process_count()} process(es)), mesh: "
         f"{ {a: n for a, n in plan.mesh_shape.items() if n != 1} }, rules: {plan.rules.name}")
  w.text(f"model: {plan.model.kind}, {models.param_count(plan.model):,} parameters; data: "
         f"{len(corpus.train_files)} train / {len(corpus.eval_files)} eval files, "
         f"{corpus.train.size:,} train tokens")
  run_.ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  stopped = False
  with use_sharding(mesh, plan.rules):
    _build(run_, mesh)
    run_.ckpt = CheckpointManager(run_.ckpt_dir, save_interval_steps=max(cfg.checkpoint_every, 1),
                                  max_to_keep=cfg.max_to_keep, async_save=cfg.async_checkpoint)
    start = 0
    latest = run_.ckpt.latest_step()
    if latest is not None:
      info = run_.ckpt.restore(latest, model=run_.model, optimizer=run_.optimizer)
      data_state = info.data_state or (info.metadata or {}).get("data_state")
      if data_state is None:
        raise errors.CheckpointError(
            f"checkpoint step {latest} in {run_.ckpt_dir} has no data position for this "
            f"process ({jax.process_count()} process(es)); resume with the process count "
            "that wrote it.", step=latest, path=run_.ckpt_dir)
      run_.data.set_state(data_state)
      start = int(info.step)
      run_.last_saved = start
      w.text(f"resumed from checkpoint step {start} in {run_.ckpt_dir}")
    profile = _profile_range(cfg.profile_steps)
    step = start
    try:
      run_.reset_timer(start)
      for step in range(start + 1, cfg.steps + 1):
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
        t0 = time.perf_counter()
        batch = next(run_.data)
        if _logs.log_local_batch(step, start + 1):
          print(_logs.local_batch_line(step, batch), flush=True)
        out = run_.train_step(run_.model, run_.optimizer, batch)
        run_.pending.append((step, out))
        if step == start + 1:
          run_.drain()  # the first step compiles: keep it out of the step times
          w.text(f"step {step} (compilation included) took {time.perf_counter() - t0:.1f} s")
          run_.reset_timer(step)
        while len(run_.pending) >= cfg.max_in_flight:
          run_.finish_oldest()
        if profile and step == profile[1]:
          run_.drain()
          jax.profiler.stop_trace()
          w.text(f"profiler trace of steps {profile[0]}-{profile[1]} in {workdir}/profile")
        for fn in hooks.on_step_end:
          fn(step)
        stop = any(fn() for fn in hooks.should_stop)
        last = step == cfg.steps
        # On a stop request (e.g. preemption) save at once, without an eval.
        do_eval = last or (cfg.eval_every and step % cfg.eval_every == 0)
        do_log = do_eval or stop or step % cfg.log_every == 0
        do_save = last or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if do_log or do_save:
          run_.drain()
        if do_log and step > start + 1 or do_eval:
          timing = run_.timing(step)
          run_.log_step(step, timing, run_.evaluate() if do_eval else None)
        if do_save:
          run_.save(step)
        if do_eval or do_save:
          run_.reset_timer(step)
        if stop:
          stopped = True
          w.text(f"stop requested: checkpointed step {step} and stopping")
          break
      run_.drain()
    finally:
      run_.data.close()
      run_.ckpt.wait_until_finished()
      run_.ckpt.close()
      w.close()
  final = max(run_.losses) if run_.losses else start
  return RunResult(start, final, run_.losses, run_.records, run_.last_eval, stopped)
