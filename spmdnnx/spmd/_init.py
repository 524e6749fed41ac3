"""Sharded initialization: build a Module with every Variable born sharded.

`sharded_init(fn)` first traces ``fn`` (which constructs a Module) with
`jax.eval_shape` to learn the abstract State, resolves a NamedSharding per
Variable from its logical axes, then runs the construction under `jax.jit`
with those ``out_shardings``. XLA partitions the initializers, so each device
only ever computes and holds its own shards: the full model never exists on
one device. Random initializers give the same values on every mesh because
JAX's partitionable threefry makes random bits independent of sharding.

Peak memory: one compiled init holds all outputs plus the initializers'
temporaries at once (on XLA:CPU the random-bit loops add ~1.4x a device's
share). With ``chunk_fraction=f`` the State is built by several compiled
programs instead, each producing Variables worth at most ``f`` of a device's
share (XLA drops the other Variables' computations from each program), so
the peak stays near ``(1 + 1.4 f)`` times the share, at the cost of one
compilation per chunk.

Create the module's `Rngs` inside ``fn`` (``lambda: Model(rngs=nnx.Rngs(0))``).
Objects captured from outside must not be changed by ``fn``; doing so raises
`TraceContextError` rather than leaking tracers.

>>> import jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Param
>>> from spmdnnx.spmd._mesh import MeshConfig, make_mesh
>>> class Tiny(Module):
...   def __init__(self):
...     self.w = Param(jnp.ones((8, 4)), logical_axes=("embed", "mlp"))
>>> mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
>>> tiny = sharded_init(Tiny, mesh=mesh, rules="fsdp_tp")
>>> tiny.w.value.sharding.spec
P('fsdp', 'tensor')
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx import _tracectx as tracectx
from spmdnnx.spmd import _context as context_lib
from spmdnnx.spmd import _partition as partition
from spmdnnx._state import State
from spmdnnx._variables import Variable


class InitPlan:
  """The pieces of a sharded init, for inspection before running it.

  Attributes:
    abstract_state: the State with `jax.ShapeDtypeStruct` values.
    shardings: the matching State of NamedShardings.
    graphdef: the module's GraphDef.
  """

  def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, mesh: Any,
               rules: Any, chunk_fraction: float | None = None):
    if chunk_fraction is not None and not 0 < chunk_fraction <= 1:
      raise errors.ConfigError(
          f"sharded_init: chunk_fraction must be in (0, 1], got {chunk_fraction!r}; "
          "pass e.g. 0.1 (each program builds at most a tenth of a device's share) or "
          "None for one program.", value=chunk_fraction)
    self._fn = fn
    self._args = args
    self._kwargs = kwargs
    self.graphdef = None
    self.abstract_state = jax.eval_shape(self._build, *args, **kwargs)
    self.shardings = partition.get_named_sharding(self.abstract_state, mesh, rules)
    self._jitted = jax.jit(self._build, out_shardings=self.shardings)
    self.chunks = self._plan_chunks(chunk_fraction)
    self._chunk_jits: dict = {}

  def _plan_chunks(self, fraction: float | None) -> list[list[int]]:
    """Groups leaf indices so each group's per-device bytes <= fraction x share."""
    leaves = [v for _, v in self.abstract_state.flat_state()]
    shards = [v for _, v in self.shardings.flat_state()]
    sizes = [_device_bytes(a, s) for a, s in zip(leaves, shards)]
    if fraction is None:
      return [list(range(len(leaves)))]
    budget = fraction * sum(sizes)
    chunks: list[list[int]] = [[]]
    used = 0
    # Largest Variables first: their temporaries then coincide with few
    # finished outputs, and the small ones come when most of the share exists.
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
      size = sizes[i]
      if chunks[-1] and used + size > budget:
        chunks.append([])
        used = 0
      chunks[-1].append(i)
      used += size
    return chunks

  def _chunk_fn(self, chunk: list[int]) -> Any:
    key = tuple(chunk)
    if key not in self._chunk_jits:
      self._chunk_jits[key] = self._make_chunk_fn(chunk)
    return self._chunk_jits[key]

  def _make_chunk_fn(self, chunk: list[int]) -> Any:
    shards = [v for _, v in self.shardings.flat_state()]

    def build_chunk(*args, **kwargs):
      leaves = [v for _, v in self._build(*args, **kwargs).flat_state()]
      return [_raw(leaves[i]) for i in chunk]

    return jax.jit(build_chunk, out_shardings=[_raw(shards[i]) for i in chunk])

  def lower_chunks(self) -> list[Any]:
    """One `jax.stages.Lowered` per chunk (a single one without chunking)."""
    return [self._chunk_fn(c).lower(*self._args, **self._kwargs) for c in self.chunks]

  def _build(self, *args: Any, **kwargs: Any) -> Any:
    with tracectx.frame("sharded_init"):
      node = self._fn(*args, **kwargs)
      graphdef, state = graph.split(node)
    self.graphdef = graphdef
    return state

  def lower(self) -> Any:
    """The `jax.stages.Lowered` init computation (``.compile()`` it for
    ``memory_analysis()``)."""
    return self._jitted.lower(*self._args, **self._kwargs)

  def run(self) -> Any:
    """Runs the init (chunk by chunk if asked) and returns the merged Module."""
    if len(self.chunks) == 1:
      state = self._jitted(*self._args, **self._kwargs)
      return graph.merge(self.graphdef, state)
    pairs = list(self.abstract_state.flat_state())
    values: list = [None] * len(pairs)
    for chunk in self.chunks:
      out = self._chunk_fn(chunk)(*self._args, **self._kwargs)
      for i, value in zip(chunk, out):
        values[i] = value
    state = State.from_flat_path(
        [(path, leaf.replace(value) if isinstance(leaf, Variable) else value)
         for (path, leaf), value in zip(pairs, values)])
    return graph.merge(self.graphdef, state)


def plan_init(fn: Callable[..., Any], *args: Any, mesh: Any = None, rules: Any = None,
              chunk_fraction: float | None = None, **kwargs: Any) -> InitPlan:
  """Traces ``fn(*args, **kwargs)`` abstractly and derives its shardings.

  Raises:
    ShardingError: if no mesh or rules are given or active.
    ConfigError: if chunk_fraction is not in (0, 1].
  """
  mesh, rules = context_lib.mesh_and_rules(mesh, rules, what="sharded_init")
  return InitPlan(fn, args, kwargs, mesh, rules, chunk_fraction)


def sharded_init(fn: Callable[..., Any], *args: Any, mesh: Any = None, rules: Any = None,
                 chunk_fraction: float | None = None, **kwargs: Any) -> Any:
  """Builds the Module ``fn(*args, **kwargs)`` with every Variable sharded.

  Args:
    fn: constructs and returns a Module (or any graph node).
    *args: passed to ``fn`` as jit arguments (arrays or pytrees of them).
    mesh: default: the ambient `use_sharding` context's.
    rules: default: the ambient context's.
    chunk_fraction: build the State in several programs, each producing at
      most this fraction of a device's share (see the module doc); None
      (default) compiles one program.
    **kwargs: passed to ``fn``.

  Returns:
    The Module, each Variable's value laid out by its logical axes.

  Raises:
    ShardingError: if no mesh or rules are given or active.
    AxisRulesError, MetadataError: as `get_named_sharding`.
  """
  return plan_init(fn, *args, mesh=mesh, rules=rules, chunk_fraction=chunk_fraction,
                   **kwargs).run()


def _raw(x: Any) -> Any:
  return x.raw_value if isinstance(x, Variable) else x


def _device_bytes(abstract: Any, sharding: Any) -> int:
  """Bytes one device holds of a leaf laid out by `sharding`."""
  value, sh = _raw(abstract), _raw(sharding)
  shape = sh.shard_shape(value.shape) if hasattr(sh, "shard_shape") else value.shape
  n = 1
  for d in shape:
    n *= d
  return n * value.dtype.itemsize
