"""Sharded initialization: build a Module with every Variable born sharded.

`sharded_init(fn)` first traces ``fn`` (which constructs a Module) with
`jax.eval_shape` to learn the abstract State, resolves a NamedSharding per
Variable from its logical axes, then runs the construction under `jax.jit`
with those ``out_shardings``. XLA partitions the initializers, so each device
only ever computes and holds its own shards: the full model never exists on
one device. Random initializers give the same values on every mesh because
JAX's partitionable threefry makes random bits independent of sharding.

Create the module's `Rngs` inside ``fn`` (``lambda: Model(rngs=nnx.Rngs(0))``).
Objects captured from outside must not be changed by ``fn``; doing so raises
`TraceContextError` rather than leaking tracers.

>>> import jax.numpy as jnp
>>> from spmdnnx.module import Module
>>> from spmdnnx.variables import Param
>>> from spmdnnx.spmd.mesh import MeshConfig, make_mesh
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

from spmdnnx import graph
from spmdnnx import tracectx
from spmdnnx.spmd import context as context_lib
from spmdnnx.spmd import partition


class InitPlan:
  """The pieces of a sharded init, for inspection before running it.

  Attributes:
    abstract_state: the State with `jax.ShapeDtypeStruct` values.
    shardings: the matching State of NamedShardings.
    graphdef: the module's GraphDef.
  """

  def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, mesh: Any,
               rules: Any):
    self._fn = fn
    self._args = args
    self._kwargs = kwargs
    self.graphdef = None
    self.abstract_state = jax.eval_shape(self._build, *args, **kwargs)
    self.shardings = partition.get_named_sharding(self.abstract_state, mesh, rules)
    self._jitted = jax.jit(self._build, out_shardings=self.shardings)

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
    """Runs the init and returns the merged Module."""
    state = self._jitted(*self._args, **self._kwargs)
    return graph.merge(self.graphdef, state)


def plan_init(fn: Callable[..., Any], *args: Any, mesh: Any = None, rules: Any = None,
              **kwargs: Any) -> InitPlan:
  """Traces ``fn(*args, **kwargs)`` abstractly and derives its shardings.

  Raises:
    ShardingError: if no mesh or rules are given or active.
  """
  mesh, rules = context_lib.resolve_args(mesh, rules, what="sharded_init")
  return InitPlan(fn, args, kwargs, mesh, rules)


def sharded_init(fn: Callable[..., Any], *args: Any, mesh: Any = None, rules: Any = None,
                 **kwargs: Any) -> Any:
  """Builds the Module ``fn(*args, **kwargs)`` with every Variable sharded.

  Args:
    fn: constructs and returns a Module (or any graph node).
    *args: passed to ``fn`` as jit arguments (arrays or pytrees of them).
    mesh: default: the ambient `use_sharding` context's.
    rules: default: the ambient context's.
    **kwargs: passed to ``fn``.

  Returns:
    The Module, each Variable's value laid out by its logical axes.

  Raises:
    ShardingError: if no mesh or rules are given or active.
    AxisRulesError, MetadataError: as `get_named_sharding`.
  """
  return plan_init(fn, *args, mesh=mesh, rules=rules, **kwargs).run()
