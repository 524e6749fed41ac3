"""nnx.compat: graph-mode (with updates) defaults whatever the mode in force."""

import jax.numpy as jnp

import spmdnnx as nnx


def test_compat_transforms_default_to_graph_mode_with_updates():
  for name in ("jit", "grad", "vmap", "scan", "custom_vjp", "vjp", "jvp", "pmap",
               "jit_partial", "checkify"):
    assert getattr(nnx.compat, name).keywords == {"graph": True, "graph_updates": True}, name
  assert nnx.compat.get_abstract_model.keywords == {"graph": True}
  assert callable(nnx.compat.cached_partial)


def test_compat_jit_shares_references_in_tree_mode_default():
  class Pair(nnx.Module):

    def __init__(self):
      self.a = nnx.Param(jnp.ones(2))
      self.b = self.a

  with nnx.set_graph_mode(False):
    @nnx.compat.jit
    def step(m):
      m.a.value = m.a.value + 1

    m = Pair()
    step(m)
  assert m.b is m.a and float(m.a.value[0]) == 2.0


def test_spmd_partition_name():
  assert nnx.spmd.PARTITION_NAME == "partition_name"


def test_as_pure_keeps_the_structure_and_unboxes_variables():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pure = nnx.as_pure(state)
  assert isinstance(pure, nnx.State)
  assert not isinstance(pure["kernel"], nnx.Variable)
  assert (pure["kernel"] == model.kernel.value).all()
  assert nnx.as_pure({"a": [nnx.Param(jnp.ones(1)), 3]})["a"][1] == 3
