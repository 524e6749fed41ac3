"""Layers lay out their outputs by activation names under use_sharding.

The embedding lookup is the case XLA gets wrong by itself: with the table in
its parameter layout (``embed`` over fsdp) and the output split by batch, the
SPMD partitioner prints "[SPMD] Involuntary full rematerialization" and
replicates the tensor. `Embed` constrains the table to its lookup layout
first, so no preset on any mesh hits that path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx.nn._attention import MultiHeadAttention
from spmdnnx.nn._embed import Embed
from spmdnnx.nn._linear import Einsum, Linear
from spmdnnx.spmd._constrain import constrain, layout_activation
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._init import sharded_init
from spmdnnx.spmd._mesh import MeshConfig, make_mesh
from spmdnnx.spmd._batch import shard_batch

REMAT = "Involuntary full rematerialization"
B, L, V, E = 8, 4, 64, 16


class TinyLM(Module):

  def __init__(self, rngs, embed_axes="default"):
    self.embed = Embed(V, E, activation_axes=embed_axes, rngs=rngs)
    self.attn = MultiHeadAttention(4, E, rngs=rngs)
    self.up = Linear(E, 2 * E, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(2 * E, E, kernel_axes=("mlp", "embed"), rngs=rngs)
    self.head = Linear(E, V, kernel_axes=("embed", "vocab"), rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    if self.embed.activation_axes is None:  # the user constrains the output by hand
      x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    h = x + self.attn(x)
    h = h + self.down(jax.nn.relu(self.up(h)))
    return self.head(h), x


def _compile_step(preset, degrees, embed_axes="default"):
  """Compiles and runs a grad step; returns the embedding output."""
  mesh = make_mesh(MeshConfig(**degrees))
  with use_sharding(mesh, preset):
    model = sharded_init(lambda: TinyLM(Rngs(0), embed_axes))
    graphdef, state = graph.split(model)
    ids = shard_batch(np.arange(B * L, dtype=np.int32).reshape(B, L) % V)

    def loss(state, ids):
      logits, x = graph.merge(graphdef, state)(ids)
      return jnp.mean(logits ** 2), x

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, x), _ = step(state, ids)
  return x


MESHES = [dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, sequence=2, tensor=2)]


@pytest.mark.slow
def test_no_involuntary_rematerialization_on_any_preset(capfd):
  # Control: the same model with only the output constrained (the table left in
  # its parameter layout) does hit XLA's fallback, so the capture works.
  _compile_step("fsdp_tp", MESHES[0], embed_axes=None)
  assert REMAT in capfd.readouterr().err
  for preset in ("dp", "fsdp", "fsdp_tp", "fsdp_tp_sp"):
    for degrees in MESHES:
      x = _compile_step(preset, degrees)
      err = capfd.readouterr().err
      assert REMAT not in err, (preset, degrees, err[-2000:])
      # The embedding output is split by batch (over data x fsdp) and whole in embed.
      assert x.sharding.shard_shape(x.shape)[0] < B, (preset, degrees, x.sharding)
      assert x.sharding.shard_shape(x.shape)[2] == E


def _has_constraint(fn, *args):
  # A fresh function each time: jax caches traces by function, not by context.
  return "sharding_constraint" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_no_constraint_and_no_cost_outside_use_sharding():
  emb = Embed(V, E, rngs=Rngs(0))
  lin = Linear(E, 8, kernel_axes=("embed", "mlp"), rngs=Rngs(0))
  ids = jnp.zeros((B, L), jnp.int32)
  assert not _has_constraint(emb, ids)
  assert not _has_constraint(lin, jnp.ones((B, E)))
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  with use_sharding(mesh, "fsdp_tp"):
    assert _has_constraint(emb, ids)
    assert _has_constraint(lin, jnp.ones((B, E)))


def test_switched_off_per_layer():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  emb = Embed(V, E, activation_axes=None, rngs=Rngs(0))
  lin = Linear(E, 8, kernel_axes=("embed", "mlp"), activation_axes=None, rngs=Rngs(0))
  mha = MultiHeadAttention(2, E, activation_axes=None, rngs=Rngs(0))
  with use_sharding(mesh, "fsdp_tp"):
    assert not _has_constraint(emb, jnp.zeros((B, L), jnp.int32))
    assert not _has_constraint(lin, jnp.ones((B, E)))
    assert not _has_constraint(mha, jnp.ones((B, L, E)))


def test_default_layouts_follow_the_preset():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  with use_sharding(mesh, "fsdp_tp"):
    emb = sharded_init(lambda: Embed(V, E, rngs=Rngs(0)))
    up = sharded_init(lambda: Linear(E, 8, kernel_axes=("embed", "mlp"), rngs=Rngs(0)))
    x = jax.jit(lambda ids: emb(ids))(shard_batch(np.zeros((B, L), np.int32)))
    h = jax.jit(lambda x: up(x))(x)
  assert x.sharding.spec == P("fsdp") and x.sharding.shard_shape(x.shape) == (B // 4, L, E)
  assert h.sharding.spec == P("fsdp", None, "tensor")
  assert h.sharding.shard_shape(h.shape) == (B // 4, L, 4)


def test_custom_names_replace_the_default():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  lin = Linear(E, 8, kernel_axes=("embed", "mlp"),
               activation_axes=("activation_batch", "activation_embed"), rngs=Rngs(0))
  ein = Einsum("bd,dh->bh", (E, 8), activation_axes=("activation_batch", "activation_mlp"),
               rngs=Rngs(0))
  with use_sharding(mesh, "fsdp_tp"):
    y = jax.jit(lambda x: lin(x))(jnp.ones((B, E)))
    z = jax.jit(lambda x: ein(x))(jnp.ones((B, E)))
  assert y.sharding.spec == P("fsdp")
  assert z.sharding.spec == P("fsdp", "tensor")


def test_rules_without_activation_names_leave_layers_alone():
  mesh = make_mesh(MeshConfig(fsdp=8))
  emb = Embed(V, E, rngs=Rngs(0))
  with use_sharding(mesh, [("vocab", None), ("embed", "fsdp")]):
    assert not _has_constraint(emb, jnp.zeros((B, L), jnp.int32))
    out = jax.jit(lambda ids: emb(ids))(jnp.zeros((B, L), jnp.int32))
  np.testing.assert_array_equal(out, emb(jnp.zeros((B, L), jnp.int32)))


def test_undivisible_dims_are_left_unconstrained_without_warning():
  mesh = make_mesh(MeshConfig(fsdp=8))
  with use_sharding(mesh, "fsdp"):
    y = jax.jit(lambda x: layout_activation(x, ("activation_batch", "activation_embed")))(
        jnp.ones((3, 4)))  # 3 is not divisible by 8: no ShardingWarning (warnings are errors)
  assert y.shape == (3, 4)


def test_values_are_unchanged_by_the_layout():
  model = TinyLM(Rngs(0))
  ids = jnp.arange(B * L, dtype=jnp.int32).reshape(B, L) % V
  expected, _ = model(ids)
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  with use_sharding(mesh, "fsdp_tp"):
    got, _ = jax.jit(lambda ids: model(ids))(ids)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_layers_inside_shard_map_are_not_constrained():
  mesh = make_mesh(MeshConfig(fsdp=8))
  lin = Linear(E, 8, kernel_axes=("embed", "mlp"), rngs=Rngs(0))
  with use_sharding(mesh, "fsdp"):
    fn = jax.shard_map(lambda x: lin(x), mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"))
    y = jax.jit(fn)(jnp.ones((B, E)))
  np.testing.assert_allclose(y, lin(jnp.ones((B, E))), rtol=1e-6)


def test_user_given_names_are_checked():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  lin = Linear(E, 8, activation_axes=("activation_batch",), rngs=Rngs(0))
  emb = Embed(V, E, activation_axes=("activation_batch", "hidden", None), rngs=Rngs(0))
  with use_sharding(mesh, "fsdp_tp"):
    with pytest.raises(errors.MetadataError, match=r"Linear: logical_axes \('activation_batch',\) "
                                                   r"has 1 entries but the array has shape "
                                                   r"\(8, 8\)"):
      lin(jnp.ones((B, E)))
    with pytest.raises(errors.AxisRulesError, match=r"No axis rule for logical name\(s\) "
                                                    r"\['hidden'\]; used by: Embed"):
      emb(jnp.zeros((B, L), jnp.int32))


@pytest.mark.parametrize("layer, match", [
    (lambda: Linear(2, 2, activation_axes="batch", rngs=Rngs(0)),
     r"Linear: activation_axes must be 'default', None \(no output constraint\) or a tuple of "
     r"logical names \(or None\) per output dimension, got 'batch'"),
    (lambda: Embed(4, 2, activation_axes=(1,), rngs=Rngs(0)),
     r"Embed: activation_axes must be 'default'.*got \(1,\)"),
    (lambda: MultiHeadAttention(2, 4, activation_axes=("a",), rngs=Rngs(0)),
     r"MultiHeadAttention: activation_axes must be 'default' or None \(no constraints\), got "
     r"\('a',\)"),
])
def test_bad_activation_axes(layer, match):
  with pytest.raises(errors.ConfigError, match=match) as info:
    layer()
  assert info.value.axes is not None
