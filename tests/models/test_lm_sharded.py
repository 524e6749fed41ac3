"""DecoderLM under use_sharding (fsdp=4, tensor=2, fsdp_tp): same math, rule layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import models
from lm_helpers import tiny, tokens


@pytest.fixture(scope="module")
def mesh():
  return nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))


def _spec(x):
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def test_parameters_have_the_rules_shardings_and_logits_match(mesh):
  cfg = tiny(tie_embeddings=False)
  ref_model = models.build_model(cfg, rngs=nnx.Rngs(0))
  t = tokens((8, 6))
  want = ref_model(t)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
    got = nnx.jit(lambda m, x: m(x))(model, t)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Logits: batch over (data, fsdp), vocab over tensor.
  assert _spec(got) == ("fsdp", None, "tensor")
  blk = model.layers.block
  expected = {
      "embedding": (model.embed.embedding, ("tensor", "fsdp")),
      "lm_head": (model.lm_head, ("fsdp", "tensor")),
      "wq": (blk.attn.wq, (None, "fsdp", "tensor", None)),
      "wk": (blk.attn.wk, (None, "fsdp", "tensor", None)),
      "wo": (blk.attn.wo, (None, "tensor", None, "fsdp")),
      "w_gate": (blk.mlp.w_gate, (None, "fsdp", "tensor")),
      "w_down": (blk.mlp.w_down, (None, "tensor", "fsdp")),
      "attn_norm": (blk.attn_norm.scale, (None, None)),
      "final_norm": (model.final_norm.scale, (None,)),
  }
  for name, (var, spec) in expected.items():
    assert _spec(var.value) == spec, name
  # Each device holds 1/8 of the stacked query projection.
  assert blk.attn.wq.value.addressable_shards[0].data.shape == (2, 4, 2, 8)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_training_steps_match_unsharded(mesh, scan_layers):
  cfg = tiny(scan_layers=scan_layers, remat="full")
  t = tokens((8, 7))

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      return models.lm_loss(m(batch[:, :-1]), batch[:, 1:], z_loss=1e-3)[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  def run(sharded):
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    if not sharded:
      return [float(step(model, opt, t)) for _ in range(3)]
    with nnx.use_sharding(mesh, "fsdp_tp"):
      return [float(step(model, opt, t)) for _ in range(3)]

  np.testing.assert_allclose(run(True), run(False), rtol=1e-5)
