"""The planner's compiled numbers against the train step the runtime really runs."""

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from spmdnnx import errors
from spmdnnx import models
from spmdnnx import train
from spmdnnx.spmd import global_batch_from_local, make_mesh, use_sharding
from spmdnnx.train import _hlo
from spmdnnx.train import _plan_compile
from test_plan import _real_init
from train_helpers import tiny_config


def test_analyze_hlo_counts_loop_bodies_and_host_crossings():
  mesh = jax.make_mesh((2, 4), ("h", "d"), axis_types=(AxisType.Auto,) * 2)

  def body(x):
    def step(_, c):
      return jax.lax.psum(c, "d") * 0.25
    y = jax.lax.fori_loop(0, 3, step, x)
    return jax.lax.all_gather(y, "h", tiled=True)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(("h", "d")), out_specs=P("d"),
                              check_vma=False))
  text = f.lower(jnp.ones((8 * 4,), jnp.float32)).compile().as_text()
  # Devices 0-3 on host 0, 4-7 on host 1: "d" groups stay inside a host,
  # "h" groups cross.
  stats = _hlo.analyze_hlo(text, num_devices=8, host_of=[0] * 4 + [1] * 4)
  assert stats.count_by_kind["all-reduce"] == 3                  # loop body x 3
  assert stats.bytes_by_kind["all-reduce"] == 3 * 2 * 16 * 3 / 4  # 4 floats, ring of 4
  assert stats.count_by_kind["all-gather"] == 1
  assert stats.bytes_by_kind["all-gather"] == 32 * 1 / 2           # 8 floats, ring of 2
  assert stats.bytes_within_host == stats.bytes_by_kind["all-reduce"]
  assert stats.bytes_across_hosts == stats.bytes_by_kind["all-gather"]


def _runtime_step_stats(cfg, layout):
  """HLO stats of the train step `train.run` builds, on a real initialized state."""
  model, optimizer = _real_init(cfg, layout)
  flat = layout.config(cfg, flat=True)
  plan = train.validate(flat, num_devices=8)
  mesh = make_mesh(plan.mesh_config)
  tokens = np.zeros((flat.batch_size, flat.seq_len), np.int32)
  with use_sharding(mesh, plan.rules):
    batch = global_batch_from_local({"inputs": tokens, "targets": tokens}, mesh, plan.rules,
                                    axes=("batch", "length"))
    step = train.make_train_step(microbatches=flat.microbatches, z_loss=flat.z_loss)
    compiled = step.lower(model, optimizer, batch).compile()
  return _hlo.analyze_hlo(compiled.as_text(), num_devices=8)


@pytest.mark.slow
def test_compiled_collectives_match_the_runtime_step_and_arguments_match_the_bytes():
  cfg = tiny_config(microbatches=2, batch_size=16)
  plan = train.plan_layouts(cfg, devices=8, compile=False, log=None)
  by = {p.name: p for p in plan.layouts}
  chosen = [by["fsdp=4,tensor=2"], by["data=2,fsdp=4"]]
  results = dict(_plan_compile.compile_in_subprocess(cfg, [p.layout for p in chosen], 8))
  for i, p in enumerate(chosen):
    got = results[i]
    assert "error" not in got, got
    real = _runtime_step_stats(cfg, p.layout)
    assert got["hlo"]["bytes_by_kind"] == real.bytes_by_kind, p.name
    assert got["hlo"]["count_by_kind"] == real.count_by_kind, p.name
    assert got["hlo"]["dot_flops"] == real.dot_flops
    assert real.total_bytes > 0
    # The step's inputs are exactly the planner's state + batch bytes.
    assert got["argument_bytes"] == (p.params_bytes + p.opt_state_bytes + p.batch_bytes
                                     + p.other_bytes), p.name
  # Both layouts gather weights over fsdp; only the tensor one all-reduces activations
  # inside every block, so it runs more all-reduces.
  assert results[0]["hlo"]["count_by_kind"]["all-reduce"] > \
      results[1]["hlo"]["count_by_kind"]["all-reduce"]


@pytest.mark.slow
def test_estimated_communication_order_holds_in_the_real_step():
  cfg = tiny_config(batch_size=64, seq_len=64)
  plan = train.plan_layouts(cfg, devices=8, compile=False, log=None)
  est = {p.name: p.comm_bytes for p in plan.layouts}
  ranked = sorted(est, key=est.get)
  subset = ranked[:2] + ranked[-2:]
  pairs = [(a, b) for a, b in itertools.combinations(subset, 2)
           if max(est[a], est[b]) > 4 * min(est[a], est[b])]
  assert len(pairs) >= 2, est        # the check below must have something to check
  layouts = {p.name: p.layout for p in plan.layouts}
  real = {name: _runtime_step_stats(cfg, layouts[name]).total_bytes for name in subset}
  for a, b in pairs:
    cheap, dear = (a, b) if est[a] < est[b] else (b, a)
    assert real[cheap] < real[dear], (cheap, dear, real, est)


@pytest.mark.slow
def test_plan_with_compilation_reports_xla_memory_and_ranks():
  cfg = tiny_config()
  lines = []
  # 2 devices (the compile subprocess has its own count): data, fsdp, tensor.
  plan = train.plan_layouts(cfg, devices=2, compile=True, log=lines.append)
  assert sorted(p.name for p in plan.layouts) == ["data=2", "fsdp=2", "tensor=2"]
  assert len(lines) == len(plan.layouts) + 1 and "compiled in" in lines[1]
  for p in plan.layouts:
    assert p.compiled["temp_bytes"] > 0 and p.compiled["output_bytes"] > 0
    assert p.flops == p.compiled["hlo"]["dot_flops"] > 0
  # The dots of the step are the model's training FLOPs (6 per weight and token,
  # attention included, no remat in lm_tiny), split over the 2 devices.
  model = models.LMConfig.from_mapping(cfg.model)
  expected = models.flops_per_token(model, cfg.seq_len) * cfg.batch_size * cfg.seq_len / 2
  for p in plan.layouts:
    assert p.flops == pytest.approx(expected, rel=0.02), p.name
  keys = [(not p.fits, p.estimate.step_s) for p in plan.layouts]
  assert keys == sorted(keys)
  assert "compiled HLO" in plan.table()


def test_a_layout_the_runtime_refuses_reports_its_error():
  cfg = tiny_config()
  layout = train.Layout((1, 1, 8, 1, 1, 1), (1,) * 6, 3, "none")   # 8 % 3 != 0
  [(index, result)] = list(_plan_compile.compile_in_subprocess(cfg, [layout], 8))
  assert index == 0
  assert result["error"].startswith("ConfigError: Invalid config value(s): batch_size=8 "
                                    "is not divisible by microbatches=3")


def test_a_compile_process_that_dies_is_reported_per_layout(monkeypatch):
  # An XLA flag XLA does not know aborts the child when its backend starts,
  # i.e. while it works on a layout: that layout reports the death, and the
  # next layout gets a fresh child (which dies the same way here).
  monkeypatch.setenv("XLA_FLAGS", "--xla_no_such_flag_for_the_planner_test=1")
  cfg = tiny_config()
  layouts = [train.Layout((1, 1, 8, 1, 1, 1), (1,) * 6, 1, "none")] * 2
  results = dict(_plan_compile.compile_in_subprocess(cfg, layouts, 8))
  assert sorted(results) == [0, 1]
  for result in results.values():
    assert "the compile process died (exit code" in result["error"]
    assert "xla_no_such_flag_for_the_planner_test" in result["error"]


def test_a_compile_process_that_never_starts_raises(monkeypatch):
  monkeypatch.setattr(sys, "executable", "/bin/false")
  layout = train.Layout((1, 1, 8, 1, 1, 1), (1,) * 6, 1, "none")
  with pytest.raises(errors.LaunchError, match=r"compile process exited \(code 1\) before "
                     r"compiling anything"):
    list(_plan_compile.compile_in_subprocess(tiny_config(), [layout], 8))
