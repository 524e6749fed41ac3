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

from spmdnnx._transforms import guards
from spmdnnx._transforms.jit import JitWrapped, Lowered, jit
from spmdnnx._transforms import lift


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


def cached_partial(fun: Callable, *cached_args: Any) -> Callable:
  """Binds `cached_args` to a (`jit`-)transformed `fun`; calls skip re-checking them.

  `jit` already keeps one plan per leading graph object, so a bound Module
  is split once and each later call only reads its Variables' values.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> f = nnx.cached_partial(nnx.jit(lambda m, x: m(x)), m)
  >>> f(jnp.ones((1, 2))).shape
  (1, 3)
  """
  return functools.partial(fun, *cached_args)
