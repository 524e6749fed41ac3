"""Mesh axis sizes, read from any of the mesh-like objects spmdnnx accepts.

Rule resolution only needs to know how large each named mesh axis is, so it
works the same on a real `jax.sharding.Mesh`, on a device-less
`jax.sharding.AbstractMesh` (planning) and on a plain ``{name: size}`` dict.

>>> axis_sizes({"fsdp": 4, "tensor": 2})
{'fsdp': 4, 'tensor': 2}
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from jax.sharding import PartitionSpec

from spmdnnx import errors


def axis_sizes(mesh: Any) -> dict[str, int]:
  """Returns ``{axis_name: size}`` for a Mesh, AbstractMesh or mapping.

  Raises:
    MeshError: if ``mesh`` is none of those.
  """
  if isinstance(mesh, Mapping):
    sizes = dict(mesh)
  elif hasattr(mesh, "shape") and hasattr(mesh, "axis_names"):
    sizes = dict(mesh.shape)
  else:
    raise errors.MeshError(
        f"Expected a jax.sharding.Mesh, AbstractMesh or a dict of axis sizes, got "
        f"{type(mesh).__name__}. Build one with spmdnnx.make_mesh(MeshConfig(...)).",
        got=type(mesh).__name__)
  bad = [f"{k!r}={v!r}" for k, v in sizes.items()
         if not isinstance(k, str) or not isinstance(v, int) or v < 1]
  if bad:
    raise errors.MeshError(
        f"Mesh axis sizes must map names (str) to positive ints; bad entries: "
        f"{errors.format_paths(bad)}.", axes=[k for k, v in sizes.items()
                                            if not isinstance(k, str) or not isinstance(v, int)
                                            or v < 1], mesh=sizes)
  return sizes


def entry_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry: None -> (), 'a' -> ('a',)."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec,
                sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The per-device block shape of an array of ``shape`` laid out by ``spec``.

  Dimensions that a spec entry does not divide evenly are rounded up, as XLA
  pads them.

  >>> shard_shape((8, 6), PartitionSpec("fsdp", None), {"fsdp": 4})
  (2, 6)
  """
  out = []
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    ways = math.prod(sizes.get(a, 1) for a in entry_axes(entry))
    out.append(-(-dim // ways))
  return tuple(out)
