"""The decoder LM trains on an Explicit-axes mesh (`make_mesh(..., axis_types="explicit")`)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import models
from spmdnnx import train
from spmdnnx.models._layers import project

CFG = dict(vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=8, mlp_dim=32, max_seq_len=16)

needs_explicit_layers = pytest.mark.skipif(
    "out_sharding" not in inspect.signature(nnx.Embed.__call__).parameters,
    reason="nn.Embed has no explicit-mode gather yet (the nn layers' out_sharding= work)")


def _losses(axis_types, microbatches, steps=3):
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2), axis_types=axis_types)
  t = jax.random.randint(jax.random.key(1), (8, 7), 0, 32, dtype=jnp.int32)
  batch = {"inputs": t[:, :-1], "targets": t[:, 1:]}
  step = train.make_train_step(microbatches=microbatches, z_loss=1e-3)
  with nnx.use_sharding(mesh, "fsdp_tp"):
    model = nnx.sharded_init(lambda: models.build_model(models.LMConfig(**CFG),
                                                        rngs=nnx.Rngs(0)))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    batch = nnx.shard_batch(batch)
    losses = [float(step(model, opt, batch)["loss"]) for _ in range(steps)]
  return losses, model, mesh


@needs_explicit_layers
@pytest.mark.parametrize("microbatches", [1, 2])
def test_lm_trains_on_an_explicit_mesh_as_on_an_auto_one(microbatches):
  explicit, model, mesh = _losses("explicit", microbatches)
  auto, _, _ = _losses("auto", microbatches)
  np.testing.assert_allclose(explicit, auto, rtol=1e-5)
  assert explicit[-1] < explicit[0]
  wq = model.layers.block.attn.wq.value
  assert wq.sharding == NamedSharding(mesh, P(None, "fsdp", "tensor", None))
  assert all(t == AxisType.Explicit for t in wq.sharding.mesh.axis_types)


def test_use_sharding_on_an_explicit_mesh_sets_it_current():
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2), axis_types="explicit")
  with nnx.use_sharding(mesh, "fsdp_tp"):
    assert jax.sharding.get_abstract_mesh().axis_names == mesh.axis_names
    # New Variables are placed by the rules at creation.
    w = nnx.Param(jnp.ones((8, 4)), logical_axes=("embed", "mlp"))
  assert w.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert jax.sharding.get_abstract_mesh().empty
  auto = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  with nnx.use_sharding(auto, "fsdp_tp"):
    assert jax.sharding.get_abstract_mesh().empty  # Auto meshes: unchanged


def test_explicit_out_sharding_of_a_projection():
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2), axis_types="explicit")
  x = jnp.ones((8, 6, 16))
  names = ("activation_batch", "activation_length", "activation_mlp")
  with nnx.use_sharding(mesh, "fsdp_tp"):
    layer = nnx.sharded_init(lambda: nnx.Linear(
        16, 32, kernel_axes=("embed", "mlp"), kernel_init=nnx.initializers.ones,
        use_bias=False, rngs=nnx.Rngs(0)))
    w = layer.kernel.value
    assert w.sharding.spec == P("fsdp", "tensor")
    x = jax.sharding.reshard(x, P("fsdp", None, None))
    # The contraction runs over the fsdp-sharded embed dim: JAX needs out_sharding.
    y = jax.jit(lambda a, b: project("btd,dm->btm", a, b, names))(x, w)
  assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(y, 16.0)


def test_explicit_out_sharding_reports_unknown_names():
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=-1), axis_types="explicit")
  with nnx.use_sharding(mesh, "fsdp"):
    with pytest.raises(errors.AxisRulesError, match=r"No axis rule for logical name"):
      nnx.spmd.explicit_out_sharding(("nonsense",), (8,))
