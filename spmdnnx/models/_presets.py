"""Named model shapes: `PRESETS` and `build_model`.

* ``lm_tiny``: trains on a 2-core CPU in minutes (byte-level vocabulary);
* ``lm_125m``: GPT-2-small-sized (d=768, 12 layers, 12 heads, vocab 50304);
* ``lm_1b``: Llama 3.2 1B shapes (d=2048, 16 layers, 32/8 heads, tied);
* ``llama3_8b``, ``llama3_70b``: Llama 3 8B / 70B shapes (vocab 128256,
  rope_theta 500000, untied), for real hardware and for the planner;
* ``mlp_quick``: a position-wise MLP LM for smoke tests.

Byte-level data uses ids below 256, so any ``vocab_size >= 256`` trains on
it; override ``vocab_size=256`` to avoid an unused embedding table.

>>> PRESETS["llama3_8b"].num_kv_heads, PRESETS["lm_tiny"].vocab_size
(8, 256)
"""

from __future__ import annotations

from typing import Any

from spmdnnx import errors
from spmdnnx._rngs import Rngs
from spmdnnx.models._config import LMConfig
from spmdnnx.models._llama import DecoderLM
from spmdnnx.models._mlp import MlpLM

PRESETS: dict[str, LMConfig] = {
    "lm_tiny": LMConfig(vocab_size=256, embed_dim=128, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, mlp_dim=384, max_seq_len=512),
    "lm_125m": LMConfig(vocab_size=50304, embed_dim=768, num_layers=12, num_heads=12,
                        num_kv_heads=12, head_dim=64, mlp_dim=2048, max_seq_len=2048),
    "lm_1b": LMConfig(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, mlp_dim=8192, max_seq_len=8192,
                      rope_theta=500_000.0, remat="full", dtype="bfloat16"),
    "llama3_8b": LMConfig(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, mlp_dim=14336, max_seq_len=8192,
                          tie_embeddings=False, rope_theta=500_000.0, remat="full",
                          dtype="bfloat16"),
    "llama3_70b": LMConfig(vocab_size=128256, embed_dim=8192, num_layers=80, num_heads=64,
                           num_kv_heads=8, head_dim=128, mlp_dim=28672, max_seq_len=8192,
                           tie_embeddings=False, rope_theta=500_000.0, remat="full",
                           dtype="bfloat16"),
    "mlp_quick": LMConfig(kind="mlp", vocab_size=256, embed_dim=64, num_layers=2,
                          num_heads=1, num_kv_heads=1, head_dim=64, mlp_dim=256,
                          max_seq_len=512),
}


def build_model(cfg: LMConfig, *, rngs: Rngs) -> Any:
  """The model ``cfg.kind`` names: `DecoderLM` ("llama") or `MlpLM` ("mlp").

  Args:
    cfg: an `LMConfig`, or the name of a preset in `PRESETS`.
    rngs: random streams for the parameters.

  Raises:
    ConfigError: for an unknown preset name or something not an LMConfig.

  >>> from spmdnnx._rngs import Rngs
  >>> type(build_model(PRESETS["mlp_quick"], rngs=Rngs(0))).__name__
  'MlpLM'
  """
  if isinstance(cfg, str):
    if cfg not in PRESETS:
      raise errors.ConfigError(
          f"build_model: no preset {cfg!r}; presets: {', '.join(PRESETS)}.")
    cfg = PRESETS[cfg]
  if not isinstance(cfg, LMConfig):
    raise errors.ConfigError(
        f"build_model: expected an LMConfig (or a preset name), got {type(cfg).__name__}; "
        "build one with LMConfig.from_mapping(...).")
  return DecoderLM(cfg, rngs=rngs) if cfg.kind == "llama" else MlpLM(cfg, rngs=rngs)
