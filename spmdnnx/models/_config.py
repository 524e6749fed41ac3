"""`LMConfig`: the hyper-parameters of a language model, validated once.

A config is a frozen dataclass, so a model built from it can keep it as a
static attribute and jit caches stay valid. Every field is checked when the
config is created; a bad value raises `ConfigError` naming the field.

>>> cfg = LMConfig(embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16)
>>> cfg.num_layers, cfg.kind
(4, 'llama')
>>> LMConfig.from_mapping({"kind": "mlp", "mlp_dim": 128}).mlp_dim
128
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from spmdnnx import errors
from spmdnnx._transforms.misc import POLICIES

#: Model kinds `build_model` knows.
KINDS = ("llama", "mlp")
#: Activation / parameter dtype names a config accepts.
DTYPES = ("float32", "bfloat16", "float16")
#: Remat policy names (those `nnx.remat` and `nnx.Stack` resolve).
REMAT_NAMES = tuple(sorted(POLICIES))


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
  return _is_int(x) or isinstance(x, (float, np.floating))


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Hyper-parameters of a decoder LM (``kind="llama"``) or an MLP LM (``"mlp"``).

  Args:
    kind: ``"llama"`` (`DecoderLM`) or ``"mlp"`` (`MlpLM`, position-wise).
    vocab_size: number of token ids (256 = byte level; id 0 separates
      documents).
    embed_dim: width of the residual stream.
    num_layers: number of blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); divides
      ``num_heads``. Equal to ``num_heads`` is ordinary multi-head attention.
    head_dim: width of one head; None means ``embed_dim // num_heads``.
    mlp_dim: hidden width of the SwiGLU MLP.
    max_seq_len: longest sequence the model accepts (training windows,
      prompt + generated tokens).
    tie_embeddings: share the token embedding with the output projection.
    rope_theta: base of the rotary position frequencies.
    norm_eps: RMSNorm epsilon.
    remat: rematerialisation policy of each block (``"none"``, ``"full"``,
      ``"save_dots"``, ``"save_dots_without_batch_dims"`` ...; see
      `REMAT_NAMES`).
    dtype: activation (compute) dtype name; logits are always float32.
    param_dtype: parameter storage dtype name.
    scan_layers: blocks in one `nnx.Stack` scanned over a ``layers`` axis
      (True) or a Python list of blocks (False).
    pipeline_microbatches: 0 (no pipeline), or the microbatches the Stack
      splits each batch into when it runs as a pipeline over the ``stage``
      mesh axis (`nnx.PipelineConfig`; needs ``scan_layers``). The run config
      sets it from its top-level field of the same name.
    pipeline_repeats: rounds of the layer chunks over the stages (circular
      pipeline); divides ``num_layers``.

  Raises:
    ConfigError: naming every invalid field.
  """

  kind: str = "llama"
  vocab_size: int = 256
  embed_dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = 32
  mlp_dim: int = 384
  max_seq_len: int = 512
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  remat: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  pipeline_microbatches: int = 0
  pipeline_repeats: int = 1

  def __post_init__(self):
    if self.head_dim is None and _is_int(self.embed_dim) and _is_int(self.num_heads) \
        and self.num_heads > 0:
      object.__setattr__(self, "head_dim", int(self.embed_dim) // int(self.num_heads))
    problems = _problems(self)
    if problems:
      raise errors.ConfigError(
          f"LMConfig: {len(problems)} invalid field(s): " + "; ".join(problems) + ".",
          keys=[p.split(" ", 1)[0] for p in problems])

  @classmethod
  def from_mapping(cls, mapping: Any) -> "LMConfig":
    """Builds a config from a dict or an ``ml_collections.ConfigDict``.

    Raises:
      ConfigError: for keys that are not fields (all listed) or bad values.

    >>> LMConfig.from_mapping({"embed_dim": 64, "head_dim": 16}).embed_dim
    64
    """
    if hasattr(mapping, "to_dict"):
      mapping = mapping.to_dict()
    if not isinstance(mapping, Mapping):
      raise errors.ConfigError(
          f"LMConfig.from_mapping: expected a dict or ConfigDict, got "
          f"{type(mapping).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in mapping if k not in names)
    if unknown:
      raise errors.ConfigError(
          f"LMConfig.from_mapping: unknown field(s) {errors.format_paths(unknown)}; "
          f"known fields: {', '.join(names)}.", keys=unknown)
    return cls(**dict(mapping))

  def replace(self, **changes: Any) -> "LMConfig":
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  @property
  def jnp_dtype(self) -> Any:
    """The activation dtype as a numpy dtype."""
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self) -> Any:
    """The parameter dtype as a numpy dtype."""
    return jnp.dtype(self.param_dtype)


def _problems(cfg: LMConfig) -> list[str]:
  """Every invalid field of `cfg`, each as ``"field: why"``."""
  out = []
  if cfg.kind not in KINDS:
    out.append(f"kind {cfg.kind!r} is not one of {list(KINDS)}")
  for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "mlp_dim", "max_seq_len"):
    v = getattr(cfg, name)
    if not _is_int(v) or v <= 0:
      out.append(f"{name} must be a positive int, got {v!r}")
  if _is_int(cfg.num_heads) and _is_int(cfg.num_kv_heads) and cfg.num_kv_heads > 0 \
      and cfg.num_heads % cfg.num_kv_heads:
    out.append(f"num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads "
               f"({cfg.num_kv_heads}) for grouped-query attention")
  if _is_int(cfg.head_dim) and cfg.head_dim > 0 and cfg.head_dim % 2:
    out.append(f"head_dim must be even for rotary embeddings, got {cfg.head_dim}")
  for name in ("tie_embeddings", "scan_layers"):
    if not isinstance(getattr(cfg, name), (bool, np.bool_)):
      out.append(f"{name} must be a bool, got {getattr(cfg, name)!r}")
  for name in ("rope_theta", "norm_eps"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not _is_number(v) or not v > 0:
      out.append(f"{name} must be a positive number, got {v!r}")
  pm, pr = cfg.pipeline_microbatches, cfg.pipeline_repeats
  if not _is_int(pm) or pm < 0:
    out.append(f"pipeline_microbatches must be an int >= 0 (0: no pipeline), got {pm!r}")
  if not _is_int(pr) or pr < 1:
    out.append(f"pipeline_repeats must be a positive int, got {pr!r}")
  elif _is_int(cfg.num_layers) and cfg.num_layers > 0 and cfg.num_layers % pr:
    out.append(f"pipeline_repeats ({pr}) must divide num_layers ({cfg.num_layers})")
  if _is_int(pm) and pm > 0 and cfg.scan_layers is False:
    out.append("pipeline_microbatches > 0 needs scan_layers=True (the pipeline runs "
               "the layers' Stack)")
  if cfg.remat not in REMAT_NAMES:
    out.append(f"remat {cfg.remat!r} is not one of {list(REMAT_NAMES)}")
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in DTYPES:
      out.append(f"{name} {getattr(cfg, name)!r} is not one of {list(DTYPES)}")
  return out
