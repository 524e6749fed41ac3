"""DecoderLM and MlpLM: shapes, causality, GQA, RoPE, Stack vs list, remat, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import models
from lm_helpers import tiny, tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
  cfg = tiny(dtype=dtype)
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  logits = model(tokens())
  assert logits.shape == (2, 6, 32) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())
  assert model.layers.block.attn.wq.value.dtype == jnp.float32   # param_dtype


def test_param_dtype_bfloat16():
  model = models.build_model(tiny(param_dtype="bfloat16", dtype="bfloat16"),
                             rngs=nnx.Rngs(0))
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  assert model(tokens()).dtype == jnp.float32


def test_parameters_carry_logical_axes():
  model = models.build_model(tiny(tie_embeddings=False), rngs=nnx.Rngs(0))
  axes = {"/".join(map(str, p)): v.logical_axes
          for p, v in nnx.state(model, nnx.Param).flat_state()}
  assert axes == {
      "embed/embedding": ("vocab", "embed"),
      "final_norm/scale": ("norm",),
      "lm_head": ("embed", "vocab"),
      "layers/block/attn/wq": ("layers", "embed", "heads", "kv"),
      "layers/block/attn/wk": ("layers", "embed", "kv_heads", "kv"),
      "layers/block/attn/wv": ("layers", "embed", "kv_heads", "kv"),
      "layers/block/attn/wo": ("layers", "heads", "kv", "embed"),
      "layers/block/attn_norm/scale": ("layers", "norm"),
      "layers/block/mlp_norm/scale": ("layers", "norm"),
      "layers/block/mlp/w_gate": ("layers", "embed", "mlp"),
      "layers/block/mlp/w_up": ("layers", "embed", "mlp"),
      "layers/block/mlp/w_down": ("layers", "mlp", "embed"),
  }


@pytest.mark.parametrize("scan_layers", [True, False])
def test_causal_future_tokens_do_not_change_earlier_logits(scan_layers):
  model = models.build_model(tiny(scan_layers=scan_layers), rngs=nnx.Rngs(0))
  t = tokens((2, 8))
  changed = t.at[:, 5].set((t[:, 5] + 7) % 32)
  a, b = model(t), model(changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-3   # later logits do change


def _attention_only(cfg, seed=0):
  return models.build_model(cfg, rngs=nnx.Rngs(seed))


def test_gqa_equals_mha_with_repeated_kv_weights():
  gqa = _attention_only(tiny(num_heads=4, num_kv_heads=2))
  mha = _attention_only(tiny(num_heads=4, num_kv_heads=4), seed=1)
  state = nnx.state(gqa, nnx.Param)
  flat = dict(state.flat_state())
  new = {}
  for path, v in nnx.state(mha, nnx.Param).flat_state():
    src = flat[path]
    if path[-1] in ("wk", "wv"):      # [layers, embed, kv_heads, kv]: head j -> j // 2
      new[path] = jnp.repeat(src.value, 2, axis=2)
    else:
      new[path] = src.value
  for path, v in nnx.state(mha, nnx.Param).flat_state():
    node = mha
    for key in path[:-1]:
      node = getattr(node, key)
    getattr(node, path[-1]).value = new[path]
  t = tokens()
  np.testing.assert_allclose(gqa(t), mha(t), atol=2e-6)


def test_rope_scores_depend_on_relative_position_only():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

  def score(m, n):
    rq = models.apply_rope(q, jnp.array([[m]]), theta=10_000.0)
    rk = models.apply_rope(k, jnp.array([[n]]), theta=10_000.0)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
  np.testing.assert_allclose(score(5, 5), float(jnp.sum(q * k)), rtol=1e-5)
  assert abs(score(3, 1) - score(3, 2)) > 1e-4
  # A rotation: norms are kept.
  r = models.apply_rope(q, jnp.array([[7]]), theta=10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(r), jnp.linalg.norm(q), rtol=1e-6)


def test_a_constant_position_offset_keeps_logits_reordering_changes_them():
  model = models.build_model(tiny(), rngs=nnx.Rngs(0))
  t = tokens()
  base = jnp.broadcast_to(jnp.arange(6), (2, 6))
  # A constant offset leaves every relative position, hence the logits, unchanged.
  np.testing.assert_allclose(model(t), model(t, positions=base + 5), atol=2e-5)
  reversed_pos = base[:, ::-1]
  assert float(jnp.abs(model(t) - model(t, positions=reversed_pos)).max()) > 1e-3


def _list_from_stack(stacked_model, cfg):
  listed = models.build_model(cfg.replace(scan_layers=False), rngs=nnx.Rngs(5))
  per_layer = nnx.unstack_state(nnx.state(stacked_model.layers.block))
  for block, st in zip(listed.layers, per_layer):
    nnx.update(block, st)
  for name in ("embed", "final_norm"):
    nnx.update(getattr(listed, name), nnx.state(getattr(stacked_model, name)))
  return listed


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_stack_and_list_give_the_same_logits(kind):
  cfg = tiny(kind=kind)
  stacked = models.build_model(cfg, rngs=nnx.Rngs(0))
  listed = _list_from_stack(stacked, cfg)
  t = tokens()
  np.testing.assert_allclose(stacked(t), listed(t), atol=1e-5)
  # And back: stack_states of the list's blocks rebuilds the stacked weights.
  restacked = nnx.stack_states([nnx.state(b) for b in listed.layers])
  np.testing.assert_array_equal(restacked["attn"]["wq"].value if kind == "llama"
                                else restacked["mlp"]["w_up"].value,
                                stacked.layers.block.attn.wq.value if kind == "llama"
                                else stacked.layers.block.mlp.w_up.value)


@pytest.mark.parametrize("remat, scan_layers", [("full", True), ("save_dots", False)])
def test_remat_keeps_logits_and_gradients(remat, scan_layers):
  cfg = tiny(scan_layers=scan_layers)
  plain = models.build_model(cfg, rngs=nnx.Rngs(0))
  rematted = models.build_model(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
  t = tokens()

  def loss(m):
    return models.lm_loss(m(t[:, :-1]), t[:, 1:])[0]

  g1 = nnx.grad(loss)(plain)
  g2 = nnx.grad(loss)(rematted)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda: nnx.grad(loss)(rematted))())
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_mlp_lm_is_position_wise():
  model = models.build_model(tiny(kind="mlp"), rngs=nnx.Rngs(0))
  t = tokens()
  changed = t.at[:, 2].set((t[:, 2] + 1) % 32)
  a, b = model(t), model(changed)
  np.testing.assert_allclose(jnp.delete(a, 2, axis=1), jnp.delete(b, 2, axis=1), atol=1e-6)
  assert a.shape == (2, 6, 32) and a.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_token_errors(kind):
  model = models.build_model(tiny(kind=kind), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ShapeError, match=r"integer ids of shape \[batch, length\], got "
                     r"float32\[2, 3\]"):
    model(jnp.zeros((2, 3)))
  with pytest.raises(errors.ShapeError, match=r"integer ids .* got int32\[5\]"):
    model(jnp.zeros((5,), jnp.int32))
  with pytest.raises(errors.ShapeError, match="17 tokens exceed max_seq_len=16"):
    model(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(errors.ShapeError, match=r"positions must have the tokens' shape \[2, 6\]"):
    model(tokens(), positions=jnp.arange(6))


def test_abstract_init_of_llama3_70b_allocates_nothing():
  cfg = models.PRESETS["llama3_70b"]
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  wq = model.layers.block.attn.wq.value
  assert isinstance(wq, jax.ShapeDtypeStruct) and wq.shape == (80, 8192, 64, 128)
  assert model.lm_head.value.shape == (8192, 128256)
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(x.size for x in leaves) == models.param_count(cfg)


def test_token_ids_outside_the_vocabulary_give_nan_not_silent_garbage():
  model = models.build_model(tiny(), rngs=nnx.Rngs(0))
  good = model(jnp.array([[1, 2, 3]], jnp.int32))
  bad = model(jnp.array([[1, 2, 40]], jnp.int32))                # vocab_size is 32
  assert bool(jnp.isfinite(good).all())
  # The lookup fills NaN, which reaches the loss (0 * NaN in attention spreads it).
  assert bool(jnp.isnan(bad[:, 2]).all())
  assert bool(jnp.isnan(models.lm_loss(bad, jnp.zeros((1, 3), jnp.int32))[0]))
