"""The record each checkpoint keeps about itself, and `describe`.

Besides the arrays, a checkpoint step holds a JSON item ``spmdnnx`` with:
every Variable's path, type, shape, dtype and logical axes per item; the
`Stack`s of the model (path, stacked axis name, number of layers); the mesh
the arrays were written from (shape, axis names, axis types); the number of
processes; and the spmdnnx, jax and orbax versions. `describe` prints it, so
a checkpoint can be inspected without the model code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any

import jax
from jax.sharding import NamedSharding

from spmdnnx import errors
from spmdnnx.checkpointing import _convert
import spmdnnx as nnx

#: Name of the JSON item holding the record inside a checkpoint step.
RECORD_ITEM = "spmdnnx"
#: Version of the record layout (bumped on incompatible changes).
FORMAT = 1


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def mesh_record(states: list[nnx.State]) -> dict | None:
  """The mesh of the first NamedSharding-placed array, as plain JSON."""
  for state in states:
    for _, leaf in state.flat_state():
      value = leaf.raw_value if isinstance(leaf, nnx.Variable) else leaf
      sharding = getattr(value, "sharding", None)
      if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh
        return {"shape": {str(k): int(v) for k, v in mesh.shape.items()},
                "axis_names": [str(a) for a in mesh.axis_names],
                "axis_types": [str(t).split(".")[-1] for t in mesh.axis_types]}
  return None


def stacks_record(model: Any) -> list[dict]:
  """Every `Stack` in ``model``: its path, stacked axis name and depth."""
  if model is None or not nnx.is_graph_node(model):
    return []
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Stack):
      out.append({"path": [str(k) for k in path], "stack_axis": node.stack_axis,
                  "num_layers": int(node.num_layers)})
  return sorted(out, key=lambda d: d["path"])


def build_record(step: int, leaves: dict[str, list], states: list[nnx.State],
                 model: Any) -> dict:
  """The JSON record saved next to a checkpoint's arrays."""
  return {
      "format": FORMAT,
      "step": int(step),
      "items": {name: [leaf.to_json() for leaf in recs] for name, recs in leaves.items()},
      "stacks": stacks_record(model),
      "mesh": mesh_record(states),
      "process_count": jax.process_count(),
      "versions": {"spmdnnx": _version("spmdnnx"), "jax": jax.__version__,
                   "orbax-checkpoint": _version("orbax-checkpoint")},
  }


def item_leaves(record: dict, item: str) -> list[_convert.Leaf] | None:
  recs = record.get("items", {}).get(item)
  return None if recs is None else [_convert.Leaf.from_json(r) for r in recs]


def read_record(step_dir: str) -> dict:
  """Reads the record of one checkpoint step directory.

  Raises:
    CheckpointError: if the step has no readable record (not written by
      spmdnnx, or incomplete).
  """
  path = os.path.join(step_dir, RECORD_ITEM, "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.CheckpointError(
        f"{step_dir} has no spmdnnx record ({path} is missing): it is not a checkpoint "
        "written by spmdnnx, or its save did not complete. Flax NNX / plain orbax "
        "checkpoints load with nnx.checkpointing.restore(path, target).",
        path=step_dir) from None
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(
        f"the spmdnnx record of {step_dir} is unreadable or corrupted ({e}); restore an "
        "earlier step.", path=step_dir) from e


def format_record(record: dict, where: str) -> str:
  """Human-readable text of a record (what `describe` returns)."""
  lines = [f"checkpoint {where}", f"  step: {record.get('step')}"]
  versions = record.get("versions", {})
  lines.append("  written by: " + ", ".join(f"{k} {v}" for k, v in versions.items())
               + f"; {record.get('process_count')} process(es)")
  mesh = record.get("mesh")
  if mesh:
    shape = ", ".join(f"{k}={v}" for k, v in mesh["shape"].items())
    lines.append(f"  mesh: {shape} (axis types {', '.join(mesh['axis_types'])})")
  else:
    lines.append("  mesh: none (single device)")
  for st in record.get("stacks", []):
    lines.append(f"  stack: {'/'.join(st['path']) or '<root>'}: {st['num_layers']} layers "
                 f"stacked on axis {st['stack_axis']!r}")
  for name, recs in record.get("items", {}).items():
    leaves = [_convert.Leaf.from_json(r) for r in recs]
    count = 0
    for leaf in leaves:
      n = 1
      for d in leaf.shape:
        n *= d
      count += n
    lines.append(f"  {name}: {len(leaves)} arrays, {count:,} values")
    for leaf in leaves:
      lines.append(f"    {leaf.name}: {leaf.show()}")
  for extra in ("metadata", "data"):
    if record.get("has_" + extra):
      lines.append(f"  {extra}: saved")
  return "\n".join(lines)
