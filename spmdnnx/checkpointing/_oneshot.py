"""One-shot `save` / `restore` for scripts and notebooks, and `describe`.

`save(path, obj)` writes a checkpoint directory with a single step (0);
`restore(path, target)` fills ``target`` in place from the latest step of a
checkpoint directory, from one step directory, or from a plain orbax
checkpoint of a State (what Flax NNX users write with
``ocp.StandardCheckpointer().save(path, nnx.state(model))``), matched by
path, shape and dtype.

>>> import tempfile, os, jax.numpy as jnp
>>> import spmdnnx as nnx
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
>>> save(path, nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
>>> target = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
>>> restore(path, target).step
0
>>> print(describe(path).splitlines()[2])
  step: 0
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from spmdnnx import errors
from spmdnnx.checkpointing import _convert
from spmdnnx.checkpointing import _manager
from spmdnnx.checkpointing import _metadata
from spmdnnx.checkpointing import _restore

#: The step a one-shot `save` writes.
ONE_SHOT_STEP = 0


def save(path: Any, obj: Any) -> None:
  """Saves a Module, Optimizer or State to a new checkpoint directory (blocking).

  Raises:
    CheckpointError: if ``path`` already holds a checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path) and os.listdir(path):
    raise errors.CheckpointError(
        f"save: {path} already exists and is not empty; choose a new path (checkpoints "
        "are never overwritten).", path=path)
  with _manager.CheckpointManager(path, async_save=False) as mngr:
    mngr.save(ONE_SHOT_STEP, model=obj, force=True)


def _locate(path: str) -> tuple[str, int | None]:
  """(manager directory, step or None for latest) of a checkpoint path."""
  if os.path.isfile(os.path.join(path, _metadata.RECORD_ITEM, "metadata")):
    parent, name = os.path.split(path.rstrip(os.sep))
    if name.isdigit():
      return parent, int(name)
  return path, None


def _is_plain_orbax(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, "_METADATA"))
          or os.path.isfile(os.path.join(path, "manifest.ocdbt")))


def restore(path: Any, target: Any, *, convert_layout: bool = False
            ) -> _manager.RestoreInfo:
  """Restores ``target`` (real or abstract) in place from ``path``.

  Args:
    path: a checkpoint directory (its latest step is used), one step
      directory, or a plain orbax checkpoint of a State (e.g. written by Flax NNX).
    target: the Module, Optimizer or State to fill.
    convert_layout: allow Stack <-> list-of-blocks conversion.

  Returns:
    A `RestoreInfo` (``step`` is None for a plain orbax checkpoint).

  Raises:
    CheckpointError: as `CheckpointManager.restore`; for a plain orbax
      checkpoint, every path whose shape or dtype differs or that exists on
      one side only.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"restore: no checkpoint at {path} (no such directory).",
                                 path=path)
  if _is_plain_orbax(path):
    return _restore_plain(path, target)
  directory, step = _locate(path)
  with _manager.CheckpointManager(directory, async_save=False) as mngr:
    return mngr.restore(step, model=target, convert_layout=convert_layout)


def describe(path: Any) -> str:
  """A readable summary of a checkpoint: steps, every array's path, shape,
  dtype and logical axes, stacks, the mesh it was written from, versions.

  Args:
    path: a checkpoint directory (its latest step is described) or one step
      directory.

  Raises:
    CheckpointError: if ``path`` holds no spmdnnx checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"describe: no checkpoint at {path} (no such directory).",
                                 path=path)
  directory, step = _locate(path)
  header = ""
  if step is None:
    steps = sorted(int(n) for n in os.listdir(directory)
                   if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
    if not steps:
      raise errors.CheckpointError(
          f"describe: {directory} holds no complete checkpoint step.", path=directory)
    step = steps[-1]
    header = f"steps: {errors.format_paths(steps)}\n"
  where = os.path.join(directory, str(step))
  return header + _metadata.format_record(_metadata.read_record(where), where)


def _strip_value(path: tuple) -> tuple:
  return path[:-1] if path and path[-1] == "value" else path


def _restore_plain(path: str, target: Any) -> _manager.RestoreInfo:
  """Restores from a plain orbax checkpoint of a State (Flax NNX layout)."""
  ckptr = ocp.StandardCheckpointer()
  try:
    tree = ckptr.metadata(path).item_metadata.tree
  except Exception as e:
    raise errors.CheckpointError(
        f"restore: {path} looks like an orbax checkpoint but its metadata cannot be read "
        f"({type(e).__name__}: {e}).", path=path) from e
  pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
  stored = {}
  for keypath, meta in pairs:
    full = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
    stored[_strip_value(full)] = (full, meta)
  state = _convert.item_state(target, "model")
  leaves = _convert.describe_leaves(state)
  ckpt_leaves = []
  for leaf in leaves:
    key = tuple(str(k) for k in leaf.path)
    if key in stored:
      _, meta = stored[key]
      ckpt_leaves.append(_convert.Leaf(leaf.path, leaf.kind, tuple(meta.shape),
                                       _dtype_name(meta.dtype), leaf.logical_axes,
                                       leaf.prng_impl))
  known = {tuple(str(k) for k in leaf.path) for leaf in leaves}
  for key, (full, meta) in stored.items():
    if key not in known:
      ckpt_leaves.append(_convert.Leaf(key, "stored", tuple(meta.shape),
                                       _dtype_name(meta.dtype), None))
  plan = _restore.plan_item(target, "model", ckpt_leaves, {}, step=None, where=path,
                            convert_layout=False)
  # Read in the stored layout (Variables may be stored as {'value': array}).
  flat = []
  for leaf, src in zip(plan.leaves, plan.sources):
    full = stored[tuple(str(k) for k in leaf.path)][0]
    flat.append((full, _convert.lookup(plan.abstract, leaf.path)))
  abstract = _convert.nest(flat)
  try:
    restored = ckptr.restore(path, abstract)
  except Exception as e:
    raise errors.CheckpointError(
        f"restore: {path} is corrupted or incomplete and cannot be read "
        f"({type(e).__name__}: {e}).", path=path) from e
  finally:
    ckptr.close()
  relaid = _convert.nest([(leaf.path, _convert.lookup(restored, stored[
      tuple(str(k) for k in leaf.path)][0])) for leaf in plan.leaves])
  _restore.apply_item(plan, relaid)
  return _manager.RestoreInfo(step=None, data_state=None, metadata=None, record={})


def _dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name
