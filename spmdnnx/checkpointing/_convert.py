"""Between live objects and the pytrees orbax reads and writes.

A checkpoint *item* (the model, the optimizer) is the State of a graph object,
stored by orbax as nested dicts of arrays whose keys are the State's path keys
as strings. Each leaf is described by a `Leaf` record (path, Variable type,
shape, dtype, logical axes); the records go into the checkpoint's metadata so
that structure can be checked, and a checkpoint described, without the model
code. PRNG key arrays are stored as their raw key data and rewrapped on
restore.

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> state = nnx.State({"w": nnx.Param(jnp.zeros((2, 3)), logical_axes=("embed", None))})
>>> describe_leaves(state)[0]
Leaf(path=('w',), kind='Param', shape=(2, 3), dtype='float32', logical_axes=('embed', None), prng_impl=None)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from spmdnnx import errors
import spmdnnx as nnx

ITEMS = ("model", "optimizer")


@dataclasses.dataclass(frozen=True)
class Leaf:
  """What a checkpoint records about one state leaf.

  Attributes:
    path: the State path (keys as in the live State: str or int).
    kind: the Variable type name (``"Param"``, ``"OptVariable"``...) or
      ``"array"`` for a bare array.
    shape: the logical shape (for PRNG keys: the key array's shape).
    dtype: the dtype name (for PRNG keys: ``"key<impl>"``).
    logical_axes: the Variable's logical axis names, or None.
    prng_impl: the PRNG implementation name of a key array, else None.
  """

  path: tuple
  kind: str
  shape: tuple
  dtype: str
  logical_axes: tuple | None
  prng_impl: str | None = None

  @property
  def name(self) -> str:
    return errors.path_str(self.path)

  def show(self) -> str:
    """``Param float32[8, 4] axes=('embed', 'mlp')``."""
    axes = "" if self.logical_axes is None else f" axes={self.logical_axes}"
    return f"{self.kind} {self.dtype}{list(self.shape)}{axes}"

  def to_json(self) -> dict:
    return {"path": [str(k) for k in self.path],
            "int_keys": [i for i, k in enumerate(self.path) if isinstance(k, int)],
            "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
            "logical_axes": None if self.logical_axes is None else list(self.logical_axes),
            "prng_impl": self.prng_impl}

  @classmethod
  def from_json(cls, d: dict) -> "Leaf":
    ints = set(d.get("int_keys", ()))
    path = tuple(int(k) if i in ints else k for i, k in enumerate(d["path"]))
    axes = d.get("logical_axes")
    return cls(path, d["kind"], tuple(d["shape"]), d["dtype"],
               None if axes is None else tuple(axes), d.get("prng_impl"))


def is_key(value: Any) -> bool:
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def item_state(obj: Any, item: str) -> nnx.State:
  """The State a checkpoint item holds: the model's, or the optimizer's own.

  An `nnx.Optimizer` refers to its model; its item leaves the model out
  (the model is its own item), so params-only restores need no optimizer.
  """
  if isinstance(obj, nnx.State):
    state = obj
  elif nnx.is_graph_node(obj):
    state = nnx.state(obj)
  else:
    raise errors.CheckpointError(
        f"checkpoint item {item!r}: expected a Module, an Optimizer or a State, got "
        f"{type(obj).__name__}.", item=item)
  if item == "optimizer" and isinstance(obj, nnx.Optimizer) and "model" in state:
    state = nnx.State({k: v for k, v in state.items() if k != "model"})
  return state


def _raw(leaf: Any) -> Any:
  return leaf.raw_value if isinstance(leaf, nnx.Variable) else leaf


def describe_leaves(state: nnx.State) -> list[Leaf]:
  """One `Leaf` record per leaf of ``state``, in its flat (sorted) order."""
  out = []
  for path, leaf in state.flat_state():
    value = _raw(leaf)
    kind = type(leaf).__name__ if isinstance(leaf, nnx.Variable) else "array"
    axes = leaf.logical_axes if isinstance(leaf, nnx.Variable) else None
    shape = tuple(int(d) for d in jnp.shape(value))
    if is_key(value):
      impl = str(jax.random.key_impl(value)) if isinstance(value, jax.Array) else \
          _impl_of_dtype(value.dtype)
      out.append(Leaf(path, kind, shape, f"key<{impl}>", axes, impl))
    else:
      out.append(Leaf(path, kind, shape, np.dtype(value.dtype).name,
                      None if axes is None else tuple(axes)))
  return out


def _impl_of_dtype(dtype: Any) -> str:
  """The PRNG implementation name of an (abstract) key dtype."""
  names = []
  jax.eval_shape(lambda k: names.append(str(jax.random.key_impl(k))),
                 jax.ShapeDtypeStruct((), dtype))
  return names[0]


def nest(pairs: list[tuple[tuple, Any]]) -> dict:
  """Nested dicts with string keys, as orbax stores a tree."""
  root: dict = {}
  for path, value in pairs:
    node = root
    for k in path[:-1]:
      node = node.setdefault(str(k), {})
    node[str(path[-1])] = value
  return root


def lookup(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[str(k)]
  return tree


def saveable(state: nnx.State) -> dict:
  """The nested dict of arrays orbax writes for ``state``.

  Raises:
    CheckpointError: if a leaf is abstract (there is nothing to save).
  """
  pairs, abstract = [], []
  for path, leaf in state.flat_state():
    value = _raw(leaf)
    if not isinstance(value, (jax.Array, np.ndarray, np.generic)):
      abstract.append(errors.path_str(path))
      continue
    pairs.append((path, jax.random.key_data(value) if is_key(value) else value))
  if abstract:
    raise errors.CheckpointError(
        f"cannot save abstract values (no arrays) at {errors.format_paths(abstract)}: "
        "save real objects; abstract ones (from nnx.eval_shape) are restore targets.",
        paths=abstract)
  return nest(pairs)


def _fallback_sharding(shardings_by_path: dict | None, path: tuple, leaf: Any) -> Any:
  if shardings_by_path is not None and path in shardings_by_path:
    return shardings_by_path[path]
  mesh = jax.sharding.get_mesh()
  if mesh is not None and not mesh.empty and isinstance(mesh, jax.sharding.Mesh):
    return NamedSharding(mesh, PartitionSpec())
  if jax.process_count() > 1:
    return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("replica",)),
                         PartitionSpec())
  return SingleDeviceSharding(jax.local_devices()[0])


def _context_shardings(state: nnx.State) -> dict | None:
  ctx = nnx.current_context()
  if ctx is None or not isinstance(ctx.mesh, jax.sharding.Mesh):
    return None
  named = nnx.get_named_sharding(state)
  return {p: _raw(v) for p, v in named.flat_state()}


def target_shardings(state: nnx.State) -> list:
  """Where each leaf of a restore target goes, in flat order.

  The sharding of the leaf's current array (or of its ShapeDtypeStruct) unless
  it is process-local in a multi-process job, else the one the active
  `use_sharding` context's rules give its logical axes,
  else replicated on the `jax.set_mesh` mesh, else on one device.
  """
  pairs = list(state.flat_state())
  out, ctx_shardings = [], ...
  for path, leaf in pairs:
    value = _raw(leaf)
    sharding = getattr(value, "sharding", None) if isinstance(
        value, (jax.Array, jax.ShapeDtypeStruct)) else None
    if sharding is not None and jax.process_count() > 1 and sharding.is_fully_addressable:
      # A process-local array (e.g. a scalar not yet through a sharded jit)
      # cannot hold a value of the global job: take the global layout.
      sharding = None
    if sharding is None:
      if ctx_shardings is ...:
        ctx_shardings = _context_shardings(state)
      sharding = _fallback_sharding(ctx_shardings, path, leaf)
    out.append(sharding)
  return out


def key_data_sharding(sharding: Any, ndim: int) -> Any:
  """The sharding of a key array's raw data (one trailing, unsharded dim)."""
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec)[:ndim]
    spec += (None,) * (ndim - len(spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec, None))
  return sharding


def abstract_tree(leaves: list[Leaf], shardings: list) -> dict:
  """ShapeDtypeStructs (with target shardings) orbax restores into."""
  pairs = []
  for leaf, sharding in zip(leaves, shardings):
    if leaf.prng_impl is not None:
      data = jax.eval_shape(jax.random.key_data,
                            jax.ShapeDtypeStruct(leaf.shape, _key_dtype(leaf.prng_impl)))
      pairs.append((leaf.path, jax.ShapeDtypeStruct(
          data.shape, data.dtype, sharding=key_data_sharding(sharding, len(leaf.shape)))))
    else:
      pairs.append((leaf.path, jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype),
                                                    sharding=sharding)))
  return nest(pairs)


def _key_dtype(impl: str) -> Any:
  return jax.random.key(0, impl=impl).dtype


def restored_state(target: nnx.State, leaves: list[Leaf], restored: dict,
                   shardings: list) -> nnx.State:
  """The target State with each leaf's value replaced by the restored array."""
  pairs = []
  for (path, leaf), rec, sharding in zip(target.flat_state(), leaves, shardings):
    value = lookup(restored, path)
    if rec.prng_impl is not None:
      value = jax.device_put(jax.random.wrap_key_data(value, impl=rec.prng_impl), sharding)
    pairs.append((path, leaf.replace(value) if isinstance(leaf, nnx.Variable) else value))
  return nnx.State.from_flat_path(pairs)
