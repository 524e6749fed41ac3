"""`jit_partial` and `cached_partial`: `jit` with leading arguments bound once.

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> step = nnx.jit_partial(lambda m, x: m(x), m)
>>> step(jnp.ones((1, 2))).shape
(1, 3)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from spmdnnx import errors
from spmdnnx import _graph as graphlib
from spmdnnx._transforms import guards
from spmdnnx._transforms.jit import JitWrapped, Lowered, jit, watch
from spmdnnx._transforms import lift
from spmdnnx._variables import EPOCH, Variable


class PartialJitWrapped:
  """`jit(fun)` with `partial_args` prepended to every call (and to `lower`)."""

  def __init__(self, jitted: JitWrapped, partial_args: tuple):
    functools.update_wrapper(self, jitted.fun)
    self.jitted = jitted
    self.partial_args = partial_args

  def __call__(self, *args, **kwargs):
    return self.jitted(*self.partial_args, *args, **kwargs)

  def lower(self, *args, **kwargs) -> "PartialLowered":
    """Lowers with the bound arguments; the compiled step takes only the rest."""
    return PartialLowered(self.jitted.lower(*self.partial_args, *args, **kwargs),
                          self.partial_args)


class PartialLowered:
  """`lower` of a `jit_partial`: `compile()` gives a step taking the unbound arguments."""

  def __init__(self, lowered: Lowered, partial_args: tuple):
    self._lowered, self._partial = lowered, partial_args

  def compile(self, *a, **k):
    compiled = self._lowered.compile(*a, **k)
    return functools.partial(compiled, *self._partial)

  def __getattr__(self, name):
    return getattr(self._lowered, name)


def jit_partial(fun: Callable, *partial_args: Any, graph: bool | None = None,
                graph_updates: bool | None = None, **jit_kwargs: Any) -> PartialJitWrapped:
  """`jit(fun)` with the leading arguments `partial_args` bound now.

  The bound arguments (typically the model and optimizer of a train step)
  are checked once; each call passes only the remaining arguments, and the
  bound objects' Variables are updated in place. ``in_shardings`` covers
  the bound arguments first, then the others (as for the full signature).

  Args:
    fun: the step function.
    *partial_args: its first positional arguments.
    graph / graph_updates: as `jit`; with ``graph=False`` a Variable shared
      between the bound arguments is refused here.
    **jit_kwargs: any other `jit` argument.

  Raises:
    TransformError: `fun` is a bound method, or (tree mode) a Variable or
      object is reachable twice in `partial_args`.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  guards.check_unbound(fun, "jit_partial")
  if not graph:
    lift.extract(tuple(partial_args), aliasing=False, who="jit_partial")
  jitted = jit(fun, graph=graph, graph_updates=graph_updates, **jit_kwargs)
  return PartialJitWrapped(jitted, tuple(partial_args))


class CachedPartial:
  """`cached_partial`'s result: calls `fun` with the cached clones first."""

  def __init__(self, fun: Callable, cached: tuple, clones: list):
    functools.update_wrapper(self, fun)
    self.fun, self.cached = fun, cached
    self.clones = [(c, graphlib.graphdef(c)) for c in clones]
    self.epoch = EPOCH[0]

  def __call__(self, *args, **kwargs):
    out = self.fun(*self.cached, *args, **kwargs)
    if self.epoch != EPOCH[0]:   # something's structure changed: were they the clones?
      changed = [i for i, (c, gd) in enumerate(self.clones) if graphlib.graphdef(c) != gd]
      if changed:
        raise errors.TransformError(
            f"cached_partial({lift.fun_name(self.fun)}): The graph structure of a node "
            f"added to cached_partial was mutated inside the transformation (cached "
            f"graph object(s) #{changed}). Only Variable values may change in a cached "
            "call: undo temporary changes before returning (e.g. nnx.pop the sown "
            "values), or call the function with the objects (no cached_partial).",
            positions=changed)
      self.epoch = EPOCH[0]
    return out


def cached_partial(fun: Callable, *cached_args: Any, graph: bool | None = None,
                   graph_updates: bool | None = None) -> Callable:
  """Binds `cached_args` to a (`jit`-)transformed `fun`, as clones made once.

  Each graph object in `cached_args` is replaced by a clone made now that
  shares its Variables (so values flow back to the original) and whose
  structure must not change: the function gets the same clones every call
  (returning one gives that clone, not the original).

  Raises:
    TransformError: graph=False or graph_updates=False; (when called) a
      cached clone's structure changed inside.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> f = nnx.cached_partial(nnx.jit(lambda m, x: m(x)), m)
  >>> f(jnp.ones((1, 2))).shape
  (1, 3)
  """
  graph_mode, graph_updates = guards.resolve_modes(graph, graph_updates)
  if not (graph_mode and graph_updates):
    raise errors.TransformError(
        "cached_partial is a graph-mode-only API and requires graph_updates=True "
        f"(got graph={graph_mode}, graph_updates={graph_updates}); use nnx.jit_partial "
        "for tree mode.")
  clones: list = []
  made: dict = {}

  def clone(x):
    if not graphlib.is_graph_node(x) or isinstance(x, Variable):
      return x
    if id(x) not in made:
      made[id(x)] = graphlib.merge(*graphlib.split(x))
      clones.append(made[id(x)])
    return made[id(x)]

  cached = jax.tree_util.tree_map(clone, cached_args, is_leaf=graphlib.is_graph_node)
  watch(graphlib.flatten(tuple(clones))[1].nodes)
  return CachedPartial(fun, cached, clones)
