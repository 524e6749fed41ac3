"""Putting input batches on the mesh.

Each leaf of a batch pytree is laid out by logical names for its leading
dimensions (``("batch",)`` by default; trailing dimensions are replicated),
resolved with the same rules as parameters, so the batch dimension lands on
whichever mesh axes the rules give ``batch`` (e.g. ``data`` x ``fsdp``).

* `shard_batch`: every process holds the whole global batch (or there is one
  process); each device receives its block.
* `global_batch_from_local`: each process holds only its own rows; the
  global array is assembled with `jax.make_array_from_process_local_data`.

>>> import numpy as np
>>> from spmdnnx.spmd._mesh import MeshConfig, make_mesh
>>> mesh = make_mesh(MeshConfig(data=2, fsdp=4))
>>> x = shard_batch({"x": np.ones((16, 3))}, mesh, "fsdp")["x"]
>>> x.sharding.spec
P(('data', 'fsdp'), None)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _partition as partition
from spmdnnx.spmd import _resolve as resolve_lib


def _leading(axes: Sequence[str | None], ndim: int) -> tuple:
  axes = tuple(axes)[:ndim]
  return axes + (None,) * (ndim - len(axes))


def _shardings(tree: Any, shapes_of: Any, mesh: Any, rules: Any,
               axes: Sequence[str | None]) -> tuple[list, list, Any]:
  paths, leaves, treedef = partition.flatten_with_paths(tree)
  shapes = [shapes_of(leaf) for leaf in leaves]
  specs = resolve_lib.resolve_all(
      [("batch",) + p for p in paths], [_leading(axes, len(s)) for s in shapes],
      shapes, rules, mesh)
  return [NamedSharding(mesh, s) for s in specs], leaves, treedef


def shard_batch(batch: Any, mesh: Any = None, rules: Any = None,
                axes: Sequence[str | None] = ("batch",)) -> Any:
  """Places a host batch on the mesh, split along its batch axes.

  Args:
    batch: a pytree of arrays, identical on every process.
    mesh: default: the ambient `use_sharding` context's.
    rules: default: the ambient context's.
    axes: logical names of each leaf's leading dimensions.

  Returns:
    The same pytree of global `jax.Array`s.

  Raises:
    ShardingError: if no mesh or rules are given or active.
    AxisRulesError: if a name in ``axes`` has no rule.

  Warns:
    ShardingWarning: if a leaf's batch size is not divisible (replicated).
  """
  mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="shard_batch")
  shardings, leaves, treedef = _shardings(batch, np.shape, mesh, rules, axes)
  out = []
  for leaf, sharding in zip(leaves, shardings):
    if isinstance(leaf, jax.Array):
      out.append(jax.device_put(leaf, sharding))
    else:
      host = np.asarray(leaf)
      out.append(jax.make_array_from_callback(host.shape, sharding,
                                              lambda index, h=host: h[index]))
  return jax.tree_util.tree_unflatten(treedef, out)


def global_batch_from_local(local: Any, mesh: Any = None, rules: Any = None,
                            axes: Sequence[str | None] = ("batch",)) -> Any:
  """Assembles a global batch from each process's own rows.

  Every process calls this with its local slice (the same shape on each).
  The global batch dimension is the local one times the number of processes
  that hold different rows; with one process the result equals `shard_batch`.

  Args:
    local: a pytree of this process's host arrays.
    mesh: default: the ambient `use_sharding` context's.
    rules: default: the ambient context's.
    axes: logical names of each leaf's leading dimensions.

  Returns:
    A pytree of global `jax.Array`s.

  Raises:
    ShardingError: if no mesh or rules are given or active.
    AxisRulesError: if a name in ``axes`` has no rule.
  """
  mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="global_batch_from_local")
  procs = jax.process_count()

  def global_shape(leaf):
    shape = np.shape(leaf)
    return (shape[0] * procs,) + tuple(shape[1:]) if shape else shape

  shardings, leaves, treedef = _shardings(local, global_shape, mesh, rules, axes)
  out = [jax.make_array_from_process_local_data(s, np.asarray(leaf))
         for leaf, s in zip(leaves, shardings)]
  return jax.tree_util.tree_unflatten(treedef, out)
