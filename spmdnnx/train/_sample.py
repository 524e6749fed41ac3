"""Sampling from a trained work directory.

`load_model` rebuilds the model from ``workdir/config.json``, lays it out on
the available devices (the run's mesh when it fits, else every device on
``fsdp``) and restores the parameters of the latest checkpoint (optimizer and
data state are not read). `sample` encodes a prompt with the byte tokenizer
and decodes with the model's KV cache (`spmdnnx.models.generate`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spmdnnx import errors
from spmdnnx import models
from spmdnnx._rngs import Rngs
from spmdnnx.checkpointing import CheckpointManager
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._init import sharded_init
from spmdnnx.spmd._mesh import MeshConfig, make_mesh
from spmdnnx.train import _config
from spmdnnx.train import _data
from spmdnnx.train import _loop


@dataclasses.dataclass
class Loaded:
  """A restored model and where it lives.

  Attributes:
    model: the model, parameters from the checkpoint.
    config: the run config.
    mesh: the mesh the parameters are laid out on.
    rules: the axis rules.
    step: the checkpoint step.
  """

  model: Any
  config: Any
  mesh: Any
  rules: Any
  step: int


def load_model(workdir: str) -> Loaded:
  """Restores the latest checkpoint's parameters of a training run.

  Raises:
    ConfigError: if ``workdir`` has no config.json.
    CheckpointError: if it has no checkpoint.
  """
  cfg = _config.base_config()
  saved = _loop.load_config(workdir)
  cfg.update(saved)
  lm_cfg = models.LMConfig.from_mapping(cfg.model)
  # A sample is one sequence: keep its batch dimension whole (replicated)
  # rather than asking the mesh to split a batch of 1.
  rules = _config.AxisRules.load(cfg.rules).override(batch=None, activation_batch=None)
  try:
    mesh = make_mesh(MeshConfig(ici=_config.parse_degrees(cfg.mesh)))
  except errors.MeshError:
    mesh = make_mesh(MeshConfig(fsdp=-1))
  ckpt_dir = os.path.join(os.path.abspath(workdir), _loop.CHECKPOINT_DIR)
  manager = CheckpointManager(ckpt_dir)
  try:
    step = manager.latest_step()
    if step is None:
      raise errors.CheckpointError(
          f"{ckpt_dir} holds no checkpoint; train first (python -m launch.train "
          f"--workdir={workdir} ...).", paths=[ckpt_dir])
    with use_sharding(mesh, rules):
      model = sharded_init(lambda: models.build_model(lm_cfg, rngs=Rngs(0)))
      manager.restore(step, model=model)
  finally:
    manager.close()
  return Loaded(model, cfg, mesh, rules, int(step))


def sample(loaded: Loaded, prompt: str, *, max_new_tokens: int = 200,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> str:
  """Generates text after ``prompt`` (the prompt is not included).

  Raises:
    ConfigError: if prompt plus new tokens exceed the model's max_seq_len.
  """
  tokens = _data.encode(prompt)
  if len(tokens) == 0:
    tokens = np.zeros((1,), np.uint8)  # an empty prompt starts a new document
  limit = models.LMConfig.from_mapping(loaded.config.model).max_seq_len
  if len(tokens) + max_new_tokens > limit:
    raise errors.ConfigError(
        f"prompt ({len(tokens)} tokens) + max_new_tokens={max_new_tokens} exceeds the "
        f"model's max_seq_len={limit}; shorten the prompt or ask for fewer tokens.")
  prompt_arr = jnp.asarray(tokens.astype(np.int32))[None]
  with use_sharding(loaded.mesh, loaded.rules):
    out = models.generate(loaded.model, prompt_arr, max_new_tokens=max_new_tokens,
                          rng=jax.random.key(seed), temperature=temperature, top_k=top_k)
  out = np.asarray(jax.device_get(out))[0]
  return _data.decode(out[len(tokens):])
