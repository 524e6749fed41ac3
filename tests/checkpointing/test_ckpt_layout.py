"""Layout conversion on restore: Stack <-> list of blocks, and Flax NNX checkpoints."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from ckpt_helpers import auto_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
N = 3


class Block(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.norm(self.lin(x)))


class Stacked(nnx.Module):

  def __init__(self, rngs):
    self.inp = nnx.Linear(2, 4, rngs=rngs)
    self.layers = nnx.Stack(lambda r: Block(r), N, rngs=rngs)

  def __call__(self, x):
    return self.layers(self.inp(x))


class Listed(nnx.Module):

  def __init__(self, rngs):
    self.inp = nnx.Linear(2, 4, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(N)])

  def __call__(self, x):
    x = self.inp(x)
    for b in self.layers:
      x = b(x)
    return x


X = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(3, 2)


def test_stack_checkpoint_into_list_form_and_back(tmp_path):
  stacked = Stacked(nnx.Rngs(0))
  expected = stacked(X)
  nnx.checkpointing.save(tmp_path / "stacked", stacked)
  listed = nnx.eval_shape(lambda: Listed(nnx.Rngs(1)))
  nnx.checkpointing.restore(tmp_path / "stacked", listed, convert_layout=True)
  for i in range(N):
    np.testing.assert_array_equal(listed.layers[i].lin.kernel.value,
                                  stacked.layers.block.lin.kernel.value[i])
  np.testing.assert_allclose(listed(X), expected, rtol=1e-6)
  # ... and back into a Stack.
  nnx.checkpointing.save(tmp_path / "listed", listed)
  again = nnx.eval_shape(lambda: Stacked(nnx.Rngs(2)))
  nnx.checkpointing.restore(tmp_path / "listed", again, convert_layout=True)
  np.testing.assert_array_equal(again.layers.block.lin.kernel.value,
                                stacked.layers.block.lin.kernel.value)
  assert again.layers.block.lin.kernel.logical_axes == ("layers", "embed", "mlp")
  np.testing.assert_allclose(again(X), expected, rtol=1e-6)


def test_layout_conversion_reads_into_the_target_shardings(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", Stacked(nnx.Rngs(0)))
  with nnx.use_sharding(auto_mesh(fsdp=4, tensor=2), "fsdp_tp"):
    listed = nnx.eval_shape(lambda: Listed(nnx.Rngs(1)))
    nnx.checkpointing.restore(tmp_path / "c", listed, convert_layout=True)
    expected = nnx.get_named_sharding(nnx.state(listed))
  assert listed.layers[1].lin.kernel.value.sharding == \
      expected["layers"][1]["lin"]["kernel"].value


def test_layout_difference_without_the_flag_is_an_error_that_names_it(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", Stacked(nnx.Rngs(0)))
  listed = nnx.eval_shape(lambda: Listed(nnx.Rngs(1)))
  with pytest.raises(nnx.errors.CheckpointError,
                     match=r"stores layers in the other layout.*convert_layout=True"):
    nnx.checkpointing.restore(tmp_path / "c", listed)


def test_layout_conversion_with_another_depth_reports_the_shapes(tmp_path):
  nnx.checkpointing.save(tmp_path / "c", Stacked(nnx.Rngs(0)))

  class Short(Listed):

    def __init__(self, rngs):
      super().__init__(rngs)
      self.layers = nnx.List([Block(rngs) for _ in range(N - 1)])

  short = nnx.eval_shape(lambda: Short(nnx.Rngs(1)))
  with pytest.raises(nnx.errors.CheckpointError,
                     match=r"in the checkpoint but not in the target: layers/2/lin/bias"):
    nnx.checkpointing.restore(tmp_path / "c", short, convert_layout=True)


class FlaxTiny(nnx.Module):
  """The same structure as the Flax model in fixtures/make_flax_checkpoint.py."""

  def __init__(self, rngs):
    self.inp = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
    self.out = nnx.Linear(4, 2, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = self.norm(self.inp(x))
    for b in self.blocks:
      x = jnp.maximum(b(x), 0.0)
    return self.out(x)


def test_flax_nnx_checkpoint_loads_into_an_spmdnnx_model():
  values = np.load(os.path.join(FIXTURES, "flax_nnx_values.npz"))
  model = FlaxTiny(nnx.Rngs(0))
  info = nnx.checkpointing.restore(os.path.join(FIXTURES, "flax_nnx_ckpt"), model)
  assert info.step is None
  flat = {"/".join(str(k) for k in p): np.asarray(v.value)
          for p, v in nnx.state(model).flat_state()}
  assert sorted(flat) == sorted(k for k in values.files if not k.startswith("__"))
  for k, v in flat.items():
    np.testing.assert_array_equal(v, values[k], err_msg=k)
  np.testing.assert_allclose(model(jnp.asarray(values["__input__"])), values["__output__"],
                             rtol=1e-5, atol=1e-6)


def test_flax_nnx_checkpoint_into_an_abstract_sharded_model():
  with nnx.use_sharding(auto_mesh(fsdp=4, tensor=2), "fsdp_tp"):
    model = nnx.eval_shape(lambda: FlaxTiny(nnx.Rngs(0)))
    nnx.checkpointing.restore(os.path.join(FIXTURES, "flax_nnx_ckpt"), model)
    expected = nnx.get_named_sharding(nnx.state(model))
  values = np.load(os.path.join(FIXTURES, "flax_nnx_values.npz"))
  np.testing.assert_array_equal(model.blocks[1].kernel.value, values["blocks/1/kernel"])
  assert model.blocks[1].kernel.value.sharding == expected["blocks"][1]["kernel"].value


def test_flax_nnx_checkpoint_into_another_structure_lists_the_differences():
  class Wider(FlaxTiny):

    def __init__(self, rngs):
      super().__init__(rngs)
      self.out = nnx.Linear(4, 3, use_bias=True, rngs=rngs)

  with pytest.raises(nnx.errors.CheckpointError,
                     match=r"out/kernel: checkpoint .*\[4, 2\].* vs target .*\[4, 3\].*"
                           r"not in the checkpoint: out/bias"):
    nnx.checkpointing.restore(os.path.join(FIXTURES, "flax_nnx_ckpt"),
                              nnx.eval_shape(lambda: Wider(nnx.Rngs(0))))
