"""sharding_report shows where arrays really are and flags those off the rules' plan."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx._variables import Param
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._init import sharded_init
from spmdnnx.spmd._mesh import MeshConfig, make_mesh, plan_abstract
from spmdnnx.spmd._report import sharding_report


class Net(Module):

  def __init__(self, rngs):
    self.w = Param(jax.random.normal(rngs.params(), (64, 32)), logical_axes=("embed", "mlp"))
    self.scale = Param(jnp.ones((32,)), logical_axes=("norm",))


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig(fsdp=4, tensor=2))


def test_single_device_arrays_show_their_real_placement_and_are_flagged(mesh):
  model = Net(Rngs(0))  # built eagerly: every array sits on one device
  with use_sharding(mesh, "fsdp_tp"):
    with pytest.warns(errors.ShardingWarning,
                      match=r"2 array\(s\) are not placed as the axis rules plan: scale \(is 1 "
                            r"device \(cpu:0\), plan replicated\), w \(is 1 device \(cpu:0\), "
                            r"plan P\(fsdp, tensor\)\)"):
      report = sharding_report(model)
  w = {r.path: r for r in report.rows}["w"]
  assert w.source == "actual" and w.placement.startswith("1 device (")
  assert w.planned == ("fsdp", "tensor") and w.differs
  assert w.bytes_per_device == 64 * 32 * 4  # the whole array, not the plan's 1/8
  assert w.replicated
  assert [r.path for r in report.misplaced] == ["scale", "w"]
  text = str(report)
  assert "differs from plan" in text.splitlines()[0]
  assert "plan P(fsdp, tensor)" in text and "4.0KiB" not in text
  assert report.to_dict()["rows"][1]["planned"] == ["fsdp", "tensor"]


def test_strict_placement_raises_listing_the_paths(mesh):
  model = Net(Rngs(0))
  with use_sharding(mesh, "fsdp_tp"):
    with pytest.raises(errors.ShardingError,
                       match=r"are not placed as the axis rules plan: .*w \(is 1 device") as info:
      sharding_report(model, strict_placement=True)
  assert sorted(info.value.paths) == ["scale", "w"]
  assert dict(zip(info.value.paths, info.value.specs))["w"] == ("fsdp", "tensor")


def test_a_sharded_model_matches_its_plan(mesh):
  with use_sharding(mesh, "fsdp_tp"):
    model = sharded_init(lambda: Net(Rngs(0)))
    report = sharding_report(model, strict_placement=True)
  assert not report.misplaced and not report.warnings
  w = {r.path: r for r in report.rows}["w"]
  assert w.spec == w.planned == ("fsdp", "tensor") and w.bytes_per_device == 64 * 32 * 4 // 8


def test_an_array_laid_out_differently_is_flagged(mesh):
  with use_sharding(mesh, "fsdp_tp"):
    model = sharded_init(lambda: Net(Rngs(0)))
    model.w.value = jax.device_put(model.w.value, NamedSharding(mesh, P(None, "fsdp")))
    with pytest.warns(errors.ShardingWarning, match=r"1 array\(s\) are not placed as the axis "
                                                    r"rules plan: w \(is P\(None, fsdp\), plan "
                                                    r"P\(fsdp, tensor\)\)"):
      report = sharding_report(model)
  w = {r.path: r for r in report.rows}["w"]
  assert w.spec == (None, "fsdp") and w.differs and w.bytes_per_device == 64 * 32 * 4 // 4


def test_abstract_state_still_shows_the_plan(mesh):
  abstract = jax.eval_shape(lambda: graph.state(Net(Rngs(0))))
  with use_sharding(plan_abstract(MeshConfig(fsdp=4, tensor=2), num_devices=8), "fsdp_tp"):
    report = sharding_report(abstract)
  w = {r.path: r for r in report.rows}["w"]
  assert w.source == "rules" and w.spec == w.planned == ("fsdp", "tensor") and not w.differs
  assert w.bytes_per_device == 64 * 32 * 4 // 8


def test_explicit_mesh_and_rules_plan_every_row(mesh):
  report = sharding_report(Net(Rngs(0)), mesh, "fsdp_tp")
  w = {r.path: r for r in report.rows}["w"]
  assert w.source == "rules" and w.spec == ("fsdp", "tensor") and not w.differs


class Odd(Module):

  def __init__(self, rngs):
    self.w = Param(jnp.ones((6, 32)), logical_axes=("embed", "mlp"))


def test_comparing_a_sharded_model_does_not_repeat_init_warnings(mesh):
  with use_sharding(mesh, "fsdp_tp"):
    with pytest.warns(errors.ShardingWarning, match=r"w dim 0 \('embed', size 6"):
      model = sharded_init(lambda: Odd(Rngs(0)))
    report = sharding_report(model)  # no second warning (warnings are errors here)
  assert not report.misplaced and report.rows[0].spec == (None, "tensor")
