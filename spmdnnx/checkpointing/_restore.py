"""Restoring one item into a live or abstract object, in place.

`plan_item` checks the target against the checkpoint's records, decides each
leaf's target sharding and returns the abstract tree orbax reads into (each
array straight into its sharding); `apply_item` writes the restored arrays
into the target's Variables (after layout conversion where one was asked for).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from spmdnnx.checkpointing import _convert
from spmdnnx.checkpointing import _layout
from spmdnnx.checkpointing import _metadata
import spmdnnx as nnx


@dataclasses.dataclass
class ItemPlan:
  """How one item is read: target, per-leaf sources and shardings, abstract tree."""

  target: Any
  state: nnx.State
  leaves: list
  sources: list
  shardings: list
  abstract: dict


def plan_item(target: Any, item: str, ckpt_leaves: list, record: dict, *, step: Any,
              where: str, convert_layout: bool) -> ItemPlan:
  """Checks ``target`` against the checkpoint and plans the read.

  Raises:
    CheckpointError: listing every path whose structure, shape, dtype or
      logical axes differ (or that exists on one side only).
  """
  state = _convert.item_state(target, item)
  leaves = _convert.describe_leaves(state)
  possible = []
  if item == "model":
    possible = _layout.conversions(record.get("stacks", []),
                                   _metadata.stacks_record(target)
                                   if not isinstance(target, nnx.State) else [],
                                   ckpt_leaves, leaves)
  convs = possible if convert_layout else []
  by_path = _layout.plan_sources(ckpt_leaves, leaves, convs)
  hint = ""
  if possible and not convert_layout:
    names = ", ".join("/".join(c.path) or "<root>" for c in possible)
    hint = (f"; the checkpoint stores {names} in the other layout (Stack vs list): "
            "pass convert_layout=True to convert it.")
  _layout.check(by_path, leaves, item=item, step=step, where=where, hint=hint)
  shardings = _convert.target_shardings(state)
  sources = [by_path[tuple(str(k) for k in leaf.path)] for leaf in leaves]
  read_leaves, read_shardings = [], []
  for leaf, src, sharding in zip(leaves, sources, shardings):
    data_sharding = _data_sharding(leaf, sharding)
    rsh = _layout.read_sharding(data_sharding, src)
    for path in src.paths:
      ckpt_leaf = _find(ckpt_leaves, path)
      read_leaves.append(ckpt_leaf)
      read_shardings.append(rsh)
  abstract = _convert.abstract_tree(read_leaves, read_shardings)
  return ItemPlan(target, state, leaves, sources, shardings, abstract)


def _data_sharding(leaf: _convert.Leaf, sharding: Any) -> Any:
  if leaf.prng_impl is None:
    return sharding
  return _convert.key_data_sharding(sharding, len(leaf.shape))


def _find(leaves: list, path: tuple) -> _convert.Leaf:
  key = tuple(str(k) for k in path)
  for leaf in leaves:
    if tuple(str(k) for k in leaf.path) == key:
      return leaf
  raise KeyError(path)


def apply_item(plan: ItemPlan, restored: dict) -> None:
  """Writes the restored arrays into the plan's target, in place."""
  pairs = []
  for (path, var), leaf, src, sharding in zip(plan.state.flat_state(), plan.leaves,
                                               plan.sources, plan.shardings):
    arrays = [_convert.lookup(restored, p) for p in src.paths]
    value = _layout.assemble(src, arrays, _data_sharding(leaf, sharding))
    if leaf.prng_impl is not None:
      value = jax.device_put(jax.random.wrap_key_data(value, impl=leaf.prng_impl), sharding)
    pairs.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
  new_state = nnx.State.from_flat_path(pairs)
  if isinstance(plan.target, nnx.State):
    _update_state(plan.target, new_state)
  else:
    nnx.update(plan.target, new_state)


def _update_state(target: nnx.State, new: nnx.State) -> None:
  for path, leaf in new.flat_state():
    node = target
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = leaf
