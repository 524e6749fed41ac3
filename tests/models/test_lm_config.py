"""LMConfig validation, presets, build_model, param_count and flops_per_token."""

import jax
import ml_collections
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import models
from lm_helpers import tiny


def test_defaults_and_head_dim_none():
  cfg = models.LMConfig(embed_dim=64, num_heads=4, head_dim=None)
  assert cfg.head_dim == 16
  assert cfg.kind == "llama" and cfg.scan_layers and cfg.remat == "none"


@pytest.mark.parametrize("changes, match", [
    (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a multiple of num_kv_heads"),
    (dict(embed_dim=0), "embed_dim must be a positive int"),
    (dict(num_layers=2.0), "num_layers must be a positive int"),
    (dict(vocab_size=True), "vocab_size must be a positive int"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(kind="gpt"), "kind 'gpt' is not one of"),
    (dict(remat="sometimes"), "remat 'sometimes' is not one of"),
    (dict(dtype="float8"), "dtype 'float8' is not one of"),
    (dict(param_dtype="int32"), "param_dtype 'int32' is not one of"),
    (dict(tie_embeddings=1), "tie_embeddings must be a bool"),
    (dict(scan_layers="yes"), "scan_layers must be a bool"),
    (dict(rope_theta=-1.0), "rope_theta must be a positive number"),
    (dict(norm_eps=0), "norm_eps must be a positive number"),
])
def test_each_bad_field_is_named(changes, match):
  with pytest.raises(errors.ConfigError, match=match):
    tiny(**changes)


def test_every_bad_field_is_listed():
  with pytest.raises(errors.ConfigError, match=r"3 invalid field\(s\)") as info:
    tiny(embed_dim=-1, dtype="f32", remat="x")
  assert info.value.keys == ["embed_dim", "remat", "dtype"]


def test_config_is_frozen_and_hashable():
  cfg = tiny()
  with pytest.raises(AttributeError):
    cfg.embed_dim = 8
  assert hash(cfg) == hash(tiny()) and cfg.replace(embed_dim=32).embed_dim == 32


def test_from_mapping_dict_and_configdict():
  d = dict(kind="mlp", vocab_size=64, mlp_dim=48, remat="full")
  assert models.LMConfig.from_mapping(d) == models.LMConfig(**d)
  assert models.LMConfig.from_mapping(ml_collections.ConfigDict(d)) == models.LMConfig(**d)


def test_from_mapping_lists_unknown_keys():
  with pytest.raises(errors.ConfigError, match="unknown field.*embed_size, n_layers") as info:
    models.LMConfig.from_mapping({"n_layers": 2, "embed_size": 8, "vocab_size": 8})
  assert info.value.keys == ["embed_size", "n_layers"]
  with pytest.raises(errors.ConfigError, match="expected a dict or ConfigDict, got list"):
    models.LMConfig.from_mapping([("embed_dim", 8)])


def test_presets_have_the_documented_shapes():
  p = models.PRESETS
  assert set(p) == {"lm_tiny", "lm_125m", "lm_1b", "llama3_8b", "llama3_70b", "mlp_quick"}
  assert (p["lm_tiny"].embed_dim, p["lm_tiny"].num_layers, p["lm_tiny"].vocab_size) == \
      (128, 4, 256)
  l8 = p["llama3_8b"]
  assert (l8.embed_dim, l8.num_layers, l8.num_heads, l8.num_kv_heads, l8.mlp_dim,
          l8.vocab_size, l8.rope_theta) == (4096, 32, 32, 8, 14336, 128256, 500000.0)
  l70 = p["llama3_70b"]
  assert (l70.embed_dim, l70.num_layers, l70.num_heads, l70.num_kv_heads, l70.mlp_dim) == \
      (8192, 80, 64, 8, 28672)
  assert p["mlp_quick"].kind == "mlp"


def test_param_count_matches_published_llama_sizes():
  assert models.param_count(models.PRESETS["llama3_8b"]) == 8_030_261_248
  assert models.param_count(models.PRESETS["llama3_70b"]) == 70_553_706_496
  assert models.param_count(models.PRESETS["lm_1b"]) == 1_235_814_400   # Llama 3.2 1B


def _real_count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("cfg", [
    tiny(), tiny(tie_embeddings=False), tiny(scan_layers=False),
    tiny(kind="mlp"), tiny(kind="mlp", tie_embeddings=False, num_layers=3),
], ids=["llama", "untied", "list", "mlp", "mlp-untied"])
def test_param_count_equals_the_models(cfg):
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  assert models.param_count(cfg) == _real_count(model)
  table = cfg.vocab_size * cfg.embed_dim
  assert models.param_count(cfg, non_embedding=True) == _real_count(model) - table


def test_param_count_of_presets_by_abstract_init():
  cfg = models.PRESETS["lm_125m"]
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  assert models.param_count(cfg) == _real_count(model) == 123_587_328


def test_flops_per_token_formula():
  cfg = tiny()
  d, L, n, k, h, m, v = 16, 2, 4, 2, 8, 32, 32
  matmul = L * (d * h * (2 * n + 2 * k) + 3 * d * m) + d * v
  assert models.flops_per_token(cfg, 10) == 6 * matmul + 12 * L * 10 * n * h
  # Tying changes the parameter count, not the FLOPs (the output matmul stays).
  assert models.flops_per_token(cfg.replace(tie_embeddings=False), 10) == \
      models.flops_per_token(cfg, 10)
  mlp = cfg.replace(kind="mlp")
  assert models.flops_per_token(mlp, 10) == 6 * (L * 3 * d * m + d * v)
  # 8B at 2048 tokens: ~6N plus attention (about 4.8e10).
  assert 4.7e10 < models.flops_per_token(models.PRESETS["llama3_8b"], 2048) < 4.9e10


def test_flops_and_param_count_errors():
  with pytest.raises(errors.ConfigError, match="seq_len must be a positive int, got 0"):
    models.flops_per_token(tiny(), 0)
  with pytest.raises(errors.ConfigError, match="expected an LMConfig, got dict"):
    models.param_count({"embed_dim": 8})


def test_build_model_picks_the_kind_and_checks_input():
  assert isinstance(models.build_model(tiny(), rngs=nnx.Rngs(0)), models.DecoderLM)
  assert isinstance(models.build_model("mlp_quick", rngs=nnx.Rngs(0)), models.MlpLM)
  with pytest.raises(errors.ConfigError, match="no preset 'lm_huge'"):
    models.build_model("lm_huge", rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match="expected an LMConfig .* got dict"):
    models.build_model({"kind": "mlp"}, rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match="DecoderLM needs an LMConfig with kind='llama'"):
    models.DecoderLM(tiny(kind="mlp"), rngs=nnx.Rngs(0))
  with pytest.raises(errors.ConfigError, match="MlpLM needs an LMConfig with kind='mlp'"):
    models.MlpLM(tiny(), rngs=nnx.Rngs(0))
