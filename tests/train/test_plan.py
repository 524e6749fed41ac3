"""The scale planner without compilation: layouts, exact bytes, estimates, errors."""

import doctest
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from spmdnnx import errors
from spmdnnx import models
from spmdnnx import train
from spmdnnx._graph import state as graph_state
from spmdnnx._optim import Optimizer
from spmdnnx._rngs import Rngs
from spmdnnx._variables import OptState, Param
from spmdnnx.spmd import make_mesh, sharded_init, use_sharding
from spmdnnx.train import _plan
from spmdnnx.train import _plan_layouts
from spmdnnx.train import _roofline
from train_helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", ["spmdnnx.train._plan", "spmdnnx.train._plan_layouts",
                                  "spmdnnx.train._roofline", "spmdnnx.train._hlo"])
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def _per_device_bytes(state):
  """Max over devices of the bytes of ``state``'s arrays held on each device."""
  held = {}
  for _, var in state.flat_state():
    for shard in var.raw_value.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


def _real_init(cfg, layout):
  """Model and optimizer exactly as `train.run` builds them (`_loop._build`)."""
  flat = layout.config(cfg, flat=True)
  plan = train.validate(flat, num_devices=jax.device_count())
  mesh = make_mesh(plan.mesh_config)
  with use_sharding(mesh, plan.rules):
    model = sharded_init(lambda: models.build_model(plan.model, rngs=Rngs(flat.seed)))
    tx, _ = train.make_optimizer(
        learning_rate=flat.learning_rate, warmup_steps=flat.warmup_steps,
        total_steps=flat.steps, min_lr_ratio=flat.min_lr_ratio,
        weight_decay=flat.weight_decay, b1=flat.adam_b1, b2=flat.adam_b2,
        eps=flat.adam_eps, grad_clip=flat.grad_clip)
    return model, Optimizer(model, tx, wrt=Param)


def test_bytes_of_params_and_optimizer_state_equal_a_real_init_for_every_layout():
  cfg = tiny_config()
  plan = train.plan_layouts(cfg, devices=8, compile=False, microbatches=[1, 2], log=None)
  names = {p.name for p in plan.layouts}
  # Several kinds of layout are listed (data, fsdp, tensor mixes), each checked.
  assert {"data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"} <= names
  checked = set()
  for p in plan.layouts:
    if p.name in checked:
      continue  # the same mesh with another microbatch count holds the same state
    model, optimizer = _real_init(cfg, p.layout)
    assert p.params_bytes == _per_device_bytes(graph_state(model, Param)), p.name
    assert p.opt_state_bytes == _per_device_bytes(graph_state(optimizer, OptState)), p.name
    checked.add(p.name)
  assert checked == names


def test_sharding_actually_shrinks_state_per_device():
  plan = train.plan_layouts(tiny_config(), devices=8, compile=False, log=None)
  by = {p.name: p for p in plan.layouts}
  # fsdp=8 holds an eighth of what pure data parallelism replicates (up to
  # unsharded norm scales), never more.
  assert by["fsdp=8"].params_bytes * 6 < by["data=8"].params_bytes
  assert by["data=8"].params_bytes == models.param_count(
      models.LMConfig.from_mapping(tiny_config().model)) * 4
  # Token batch: int32 inputs + targets split over the 8 batch ways.
  assert by["data=8"].batch_bytes == 2 * 8 * 32 * 4 // 8


def test_layouts_respect_hosts_tensor_and_divisibility():
  cfg = tiny_config()
  layouts, skipped = train.enumerate_layouts(cfg, devices=16, devices_per_host=4)
  reasons = dict(skipped)
  for layout in layouts:
    assert layout.dcn[-1] == 1                      # tensor never crosses a host
    assert math.prod(layout.ici) == 4                # a host's 4 devices
  # tensor=4 would split kv_heads=2: rejected with the Variable named.
  assert any("kv_heads=2" in r and "tensor:4" in r for r in reasons.values())
  # expert/sequence are not used by the fsdp_tp rules for this model: never enumerated.
  assert all(layout.degrees["expert"] == 1 and layout.degrees["sequence"] == 1
             for layout in layouts)
  # the runtime's validate rejects batch splits that do not divide.
  assert any("not divisible by the 16 ways" in r for r in reasons.values())


def test_across_host_split_and_host_of_each_device():
  layout = _plan_layouts.Layout((1, 1, 2, 1, 1, 2), (2, 1, 1, 1, 1, 1), 1, "none")
  assert layout.name == "data=2,fsdp=2,tensor=2"
  assert layout.mesh_flags() == {"mesh": "fsdp=2,tensor=2", "mesh_dcn": "data=2"}
  assert _plan_layouts.device_of_host(layout) == [0, 0, 0, 0, 1, 1, 1, 1]
  assert _plan_layouts.split_levels((2, 1, 2, 1, 1, 2), 4) == \
      ((1, 1, 2, 1, 1, 2), (2, 1, 1, 1, 1, 1))


def test_remat_and_microbatch_choices_change_the_estimates():
  cfg = tiny_config(batch_size=16)
  plan = train.plan_layouts(cfg, devices=8, compile=False, microbatches=[1, 2],
                            remat=["none", "full"], log=None)
  by = {(p.name, p.layout.microbatches, p.layout.remat): p for p in plan.layouts}
  a, b = by[("fsdp=8", 1, "none")], by[("fsdp=8", 2, "none")]
  assert b.activation_bytes < a.activation_bytes       # half the sequences at a time
  assert b.comm_bytes > a.comm_bytes                   # weights gathered per microbatch
  full = by[("fsdp=8", 1, "full")]
  assert full.activation_bytes < a.activation_bytes and full.flops > a.flops
  assert b.params_bytes == a.params_bytes


def test_ranked_fitting_first_then_by_step_time():
  plan = train.plan_layouts(train.base_config(), devices=8, compile=False, log=None)
  keys = [(not p.fits, p.estimate.step_s) for p in plan.layouts]
  assert keys == sorted(keys)
  for p in plan.layouts:
    assert p.tokens_per_s == pytest.approx(16 * 128 / p.estimate.step_s)
    assert 0 < p.mfu < 1


def test_70b_on_512_devices_without_compiling():
  spec = importlib.util.spec_from_file_location(
      "llama3_70b", os.path.join(ROOT, "configs", "llama3_70b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  plan = train.plan_layouts(cfg, devices=512, compile=False, log=None)
  assert len(plan.layouts) >= 12
  best = plan.layouts[0]
  assert best.fits and best.layout.degrees["tensor"] in (4, 8)
  # Exact: fp32 parameters over every non-data axis.
  n = models.param_count(models.PRESETS["llama3_70b"])
  g = best.layout.degrees
  assert abs(best.params_bytes - 4 * n / (512 // g["data"])) < 4 * n / 512 * 0.01


def test_stage_layout_adds_pipeline_bubble_and_permutes():
  model = models.PRESETS["lm_tiny"]
  cfg = tiny_config()
  layout = _plan_layouts.Layout((1, 4, 2, 1, 1, 1), (1,) * 6, 1, "none")
  assert _plan.estimate_comm(model, cfg, layout, 10**6)["by_kind"]["collective-permute"] == 0
  cfg.unlock()
  cfg.pipeline_microbatches = 8
  comm = _plan.estimate_comm(model, cfg, layout, 10**6)
  assert comm["by_kind"]["collective-permute"] > 0
  bubble = _roofline.bubble_fraction(4, 8)
  assert bubble == pytest.approx(3 / 11)
  est = _roofline.estimate_step(train.get_device_kind("h100"), flops=1e12, hbm_bytes=0,
                                bytes_within_host=0, bytes_across_hosts=0, bubble=bubble)
  assert est.step_s == pytest.approx(1e12 / 989e12 / (1 - 3 / 11))


def test_pipelined_config_lists_stage_layouts_with_bubble_and_exact_bytes():
  cfg = tiny_config(**{"model.num_layers": 4})
  cfg.unlock()
  cfg.pipeline_microbatches = 4
  plan = train.plan_layouts(cfg, devices=8, compile=False, log=None)
  staged = [p for p in plan.layouts if p.layout.degrees["stage"] > 1]
  assert staged, [p.name for p in plan.layouts]
  for p in staged:
    s = p.layout.degrees["stage"]
    assert p.estimate.bubble == pytest.approx((s - 1) / (4 + s - 1))
  p = next(p for p in staged if p.name == "stage=4,fsdp=2") if any(
      p.name == "stage=4,fsdp=2" for p in staged) else staged[0]
  model, optimizer = _real_init(cfg, p.layout)
  assert p.params_bytes == _per_device_bytes(graph_state(model, Param)), p.name
  assert p.opt_state_bytes == _per_device_bytes(graph_state(optimizer, OptState)), p.name
  assert all(p.estimate.bubble == 0 for p in plan.layouts if p.layout.degrees["stage"] == 1)


# --- errors -------------------------------------------------------------------------

def test_unknown_device_kind():
  with pytest.raises(errors.ConfigError, match=r"Unknown device kind 'h1000'.*did you "
                     r"mean 'h100'.*known kinds: h100, h200, a100"):
    train.plan_layouts(tiny_config(), devices=8, device="h1000", compile=False, log=None)


def test_device_count_no_layout_can_use():
  with pytest.raises(errors.MeshError, match=r"No layout of 7 devices \(7 per host\) can "
                     r"run this config: .*kv_heads=2.*batch_size=8 .* not divisible"):
    train.plan_layouts(tiny_config(), devices=7, devices_per_host=7, compile=False,
                       log=None)


def test_device_count_not_whole_hosts():
  with pytest.raises(errors.MeshError, match=r"12 devices are not a whole number of hosts "
                     r"of 8 devices; use a multiple of 8 \(e.g. 8 or 16\)"):
    train.plan_layouts(tiny_config(), devices=12, compile=False, log=None)
  with pytest.raises(errors.MeshError, match=r"--devices=0: give a positive"):
    train.enumerate_layouts(tiny_config(), devices=0)
  with pytest.raises(errors.MeshError, match=r"--devices_per_host=0: give a positive"):
    train.enumerate_layouts(tiny_config(), devices=8, devices_per_host=0)


def test_model_that_fits_nowhere_says_by_how_much_and_what_would():
  cfg = train.base_config()
  cfg.model = train.model_config("llama3_70b")
  cfg.batch_size, cfg.seq_len = 16, 1024
  plan = train.plan_layouts(cfg, devices=8, device="tpu_v5e", compile=False, log=None)
  assert not any(p.fits for p in plan.layouts)
  with pytest.raises(errors.ConfigError, match=r"fits on no layout of 8 tpu_v5e devices.*"
                     r"needs .* GB per device .* GB over\. Try: more devices .*at least "
                     r"~\d+ tpu_v5e devices") as info:
    plan.raise_if_none_fits()
  assert info.value.over_bytes > 0 and info.value.devices == 8


def test_cli_no_compile_prints_table_and_writes_json(tmp_path):
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.plan", "--config=configs/lm_tiny.py", "--devices=8",
       "--no_compile", "--top=3", f"--json={out}"], cwd=ROOT, capture_output=True,
      text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr
  assert "[1/" in proc.stdout and "layout" in proc.stdout and "MFU" in proc.stdout
  data = json.loads(out.read_text())
  assert len(data["layouts"]) >= 4 and data["device"]["name"] == "h100"
  assert data["layouts"][0]["fits"] is True
  bad = subprocess.run(
      [sys.executable, "-m", "launch.plan", "--config=configs/lm_tiny.py", "--devices=8",
       "--no_compile", "--device=b200x"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
  assert bad.returncode == 1
  assert "ConfigError: Unknown device kind 'b200x'" in bad.stderr
  bad = subprocess.run(
      [sys.executable, "-m", "launch.plan", "--config=configs/lm_tiny.py", "--devices=8",
       "--no_compile", "--microbatches=2,many"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
  assert bad.returncode == 1
  assert "--microbatches=2,many: give integers" in bad.stderr
