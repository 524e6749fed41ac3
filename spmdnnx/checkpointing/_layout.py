"""Matching a checkpoint's leaves to a restore target: structure checks, Stack <-> list.

A restore maps every target leaf to a *source* in the checkpoint: the leaf at
the same path, or (when the user asks for layout conversion) one layer of a
stacked leaf, or the per-layer leaves stacked together. `plan_sources`
builds that map and `check` compares the checkpoint's records with the
target's, raising one `CheckpointError` that lists every mismatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from spmdnnx import errors
from spmdnnx.checkpointing._convert import Leaf


def _key(path: tuple) -> tuple:
  return tuple(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a target leaf's value comes from.

  Attributes:
    leaf: the checkpoint's description, in the target's layout.
    paths: checkpoint paths read (one, or one per layer for ``"stack"``).
    op: ``"same"``, ``"slice"`` (layer ``index`` of a stacked leaf) or
      ``"stack"`` (per-layer leaves stacked on a new leading axis).
    index: the layer for ``"slice"``.
  """

  leaf: Leaf
  paths: tuple
  op: str = "same"
  index: int = 0


@dataclasses.dataclass(frozen=True)
class Conversion:
  """One Stack <-> list conversion at ``path`` (``"unstack"`` or ``"stack"``)."""

  path: tuple
  op: str
  num_layers: int
  stack_axis: str


def conversions(record_stacks: list[dict], target_stacks: list[dict],
                ckpt_leaves: list[Leaf], target_leaves: list[Leaf]) -> list[Conversion]:
  """The layout conversions that turn the checkpoint's layout into the target's."""
  ckpt_at = {tuple(s["path"]): s for s in record_stacks}
  target_at = {tuple(s["path"]): s for s in target_stacks}
  out = []
  for path, s in ckpt_at.items():
    if path not in target_at and _has_layers(target_leaves, path):
      out.append(Conversion(path, "unstack", s["num_layers"], s["stack_axis"]))
  for path, s in target_at.items():
    if path not in ckpt_at and _has_layers(ckpt_leaves, path):
      out.append(Conversion(path, "stack", s["num_layers"], s["stack_axis"]))
  return out


def _has_layers(leaves: list[Leaf], prefix: tuple) -> bool:
  n = len(prefix)
  return any(_key(l.path[:n]) == prefix and len(l.path) > n and isinstance(l.path[n], int)
             for l in leaves)


def plan_sources(ckpt_leaves: list[Leaf], target_leaves: list[Leaf],
                 convs: list[Conversion]) -> dict[tuple, Source]:
  """Checkpoint sources keyed by target path (as strings), after conversions."""
  by_key = {_key(l.path): l for l in ckpt_leaves}
  sources: dict[tuple, Source] = {}
  converted: set = set()
  for c in convs:
    n = len(c.path)
    if c.op == "unstack":
      block = c.path + ("block",)
      for l in ckpt_leaves:
        k = _key(l.path)
        if k[:n + 1] != block:
          continue
        converted.add(k)
        axes = l.logical_axes
        if axes is not None and axes and axes[0] == c.stack_axis:
          axes = axes[1:]
        for i in range(l.shape[0] if l.shape else 0):
          tpath = l.path[:n] + (i,) + l.path[n + 1:]
          sources[_key(tpath)] = Source(
              dataclasses.replace(l, path=tpath, shape=l.shape[1:], logical_axes=axes),
              (l.path,), "slice", i)
    else:
      groups: dict[tuple, dict[int, Leaf]] = {}
      for l in ckpt_leaves:
        k = _key(l.path)
        if k[:n] != c.path or len(l.path) <= n or not isinstance(l.path[n], int):
          continue
        converted.add(k)
        groups.setdefault(k[n + 1:], {})[l.path[n]] = l
      for rest, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
          continue  # gaps: reported as missing/extra paths by `check`
        first = layers[0]
        axes = first.logical_axes
        axes = None if axes is None else (c.stack_axis,) + tuple(axes)
        tpath = c.path + ("block",) + first.path[n + 1:]
        sources[_key(tpath)] = Source(
            dataclasses.replace(first, path=tpath, shape=(len(layers),) + first.shape,
                                logical_axes=axes),
            tuple(layers[i].path for i in range(len(layers))), "stack")
  for k, l in by_key.items():
    if k not in converted:
      sources.setdefault(k, Source(l, (l.path,)))
  return sources


def check(sources: dict[tuple, Source], target_leaves: list[Leaf], *, item: str,
          step: int | None, where: str, hint: str = "") -> None:
  """Raises CheckpointError listing every target/checkpoint difference.

  Compares paths, Variable types, shapes, dtypes and logical axes.
  """
  target_keys = {_key(l.path) for l in target_leaves}
  missing, extra, differ = [], [], []
  for l in target_leaves:
    src = sources.get(_key(l.path))
    if src is None:
      missing.append(f"{l.name} ({l.show()})")
      continue
    c = src.leaf
    if (c.shape, c.dtype, c.logical_axes, c.kind) != (l.shape, l.dtype, l.logical_axes,
                                                      l.kind):
      differ.append(f"{l.name}: checkpoint {c.show()} vs target {l.show()}")
  for k, src in sources.items():
    if k not in target_keys:
      extra.append(f"{src.leaf.name} ({src.leaf.show()})")
  if not (missing or extra or differ):
    return
  parts = []
  if differ:
    parts.append(f"{len(differ)} differ: {errors.format_paths(differ)}")
  if missing:
    parts.append(f"{len(missing)} in the target but not in the checkpoint: "
                 f"{errors.format_paths(missing)}")
  if extra:
    parts.append(f"{len(extra)} in the checkpoint but not in the target: "
                 f"{errors.format_paths(extra)}")
  raise errors.CheckpointError(
      f"the {item} does not match checkpoint step {step} at {where}: " + "; ".join(parts)
      + ". Build the target with the same configuration as the saved model (sizes, "
      "layers, logical axes)" + (hint or ".") ,
      item=item, step=step, path=where, paths=sorted(
          [m.split(" (")[0] for m in missing] + [e.split(" (")[0] for e in extra]
          + [d.split(": ")[0] for d in differ]))


def read_sharding(target_sharding: Any, src: Source) -> Any:
  """The sharding to read a source's checkpoint array(s) into."""
  if src.op == "same" or not isinstance(target_sharding, NamedSharding):
    return target_sharding
  spec = tuple(target_sharding.spec)
  if src.op == "slice":
    return NamedSharding(target_sharding.mesh, PartitionSpec(None, *spec))
  return NamedSharding(target_sharding.mesh, PartitionSpec(*spec[1:]))


def assemble(src: Source, arrays: list, target_sharding: Any) -> jax.Array:
  """The target value from the restored checkpoint array(s) of ``src``."""
  if src.op == "same":
    return arrays[0]
  if src.op == "slice":
    return jax.device_put(arrays[0][src.index], target_sharding)
  return jax.device_put(jnp.stack(arrays), target_sharding)
