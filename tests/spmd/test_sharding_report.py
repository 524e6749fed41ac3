"""Tests for sharding_report: rows, totals, warnings, strict mode, planning."""

import json

import jax
import jax.numpy as jnp
import pytest

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._init import sharded_init
from spmdnnx.spmd._mesh import MeshConfig, make_mesh, plan_abstract
from spmdnnx.spmd._report import sharding_report
from spmdnnx._state import State
from spmdnnx._variables import OptState, Param


class Net(Module):

  def __init__(self, rngs):
    self.w = Param(jax.random.normal(rngs.params(), (64, 32)), logical_axes=("embed", "mlp"))
    self.scale = Param(jnp.ones((32,)), logical_axes=("norm",))
    self.loose = Param(jnp.ones((16, 16)))


def test_report_of_a_sharded_model_uses_actual_shardings():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  with use_sharding(mesh, "fsdp_tp"):
    model = sharded_init(lambda: Net(Rngs(0)))
  report = sharding_report(model)
  rows = {r.path: r for r in report.rows}
  assert rows["w"].source == "actual" and rows["w"].spec == ("fsdp", "tensor")
  assert rows["w"].bytes == 64 * 32 * 4 and rows["w"].bytes_per_device == 64 * 32 * 4 // 8
  assert not rows["w"].replicated
  assert rows["scale"].replicated and rows["loose"].replicated
  assert rows["loose"].logical_axes is None
  totals = report.totals()
  assert totals["per_device"]["params"] == 1024 + 128 + 1024
  assert report.replicated_param_fraction == pytest.approx((128 + 1024) / (8192 + 128 + 1024))


def test_planning_a_512_device_layout_without_devices():
  abstract = jax.eval_shape(lambda: graph.state(Net(Rngs(0)), Param))
  mesh = plan_abstract(MeshConfig(fsdp=-1, tensor=2), num_devices=512)
  with pytest.warns(errors.ShardingWarning, match=r"w dim 0 \('embed', size 64; tried fsdp=256"):
    report = sharding_report(abstract, mesh, "fsdp_tp")
  assert report.num_devices == 512
  assert {r.path: r.spec for r in report.rows}["w"] == (None, "tensor")
  assert all(r.source == "rules" for r in report.rows)


def test_params_and_optimizer_state_totals():
  s = State({"p": Param(jnp.zeros((8, 4)), logical_axes=("embed", "mlp")),
             "opt": {"mu": OptState(jnp.zeros((8, 4)), logical_axes=("embed", "mlp")),
                     "count": OptState(jnp.zeros((), jnp.int32))}})
  report = sharding_report(s, {"fsdp": 4, "tensor": 2}, [("embed", "fsdp"), ("mlp", "tensor")])
  totals = report.totals()
  assert totals["per_device"] == {"params": 16, "opt_state": 20, "other": 0, "total": 36}
  assert totals["global"] == {"params": 128, "opt_state": 132, "other": 0, "total": 260}


def test_str_and_to_dict():
  mesh = make_mesh(MeshConfig(fsdp=8))
  report = sharding_report(Net(Rngs(0)), mesh, "fsdp")
  text = str(report)
  assert text.splitlines()[0].split() == ["path", "type", "shape", "dtype", "logical", "axes",
                                          "sharding", "bytes/device", "replicated"]
  assert "w      Param  64x32  float32  (embed, mlp)  P(fsdp, None)  1.0KiB" in text
  assert "mesh: data=1 x stage=1 x fsdp=8 x expert=1 x sequence=1 x tensor=1 (8 devices)" in text
  data = json.loads(json.dumps(report.to_dict()))
  assert data["rows"][2]["spec"] == ["fsdp", None] and data["num_devices"] == 8
  assert data["totals"]["per_device"]["params"] == 1024 + 128 + 1024


def test_warns_about_large_unannotated_and_replicated_params():
  mesh = make_mesh(MeshConfig(fsdp=8))
  with pytest.warns(errors.ShardingWarning) as record:
    report = sharding_report(Net(Rngs(0)), mesh, "fsdp", large_bytes=100)
  messages = [str(r.message) for r in record]
  assert any(m.startswith("1 large parameter(s) have no logical_axes and are replicated on "
                          "every device: loose (1.0KiB)") for m in messages)
  assert any(m.startswith("1 large parameter(s) are fully replicated by the rules: scale "
                          "(128B)") for m in messages)
  assert len(report.warnings) == 2


def test_strict_mode_raises_over_the_fraction():
  mesh = make_mesh(MeshConfig(fsdp=8))
  with pytest.raises(errors.ShardingError,
                     match=r"12.3% of parameter bytes are fully replicated, more than the "
                           r"allowed 5.0%: loose \(1.0KiB, axes None\), scale \(128B, axes "
                           r"\('norm',\)\)"):
    sharding_report(Net(Rngs(0)), mesh, "fsdp", strict_replicated_fraction=0.05)
  sharding_report(Net(Rngs(0)), mesh, "fsdp", strict_replicated_fraction=0.2)


def test_one_device_mesh_replicates_nothing():
  mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
  report = sharding_report(Net(Rngs(0)), mesh, "fsdp", strict_replicated_fraction=0.0)
  assert not any(r.replicated for r in report.rows)


def test_needs_rules_for_planned_rows():
  with pytest.raises(errors.ShardingError, match=r"sharding_report needs mesh and rules"):
    sharding_report(Net(Rngs(0)))
