"""`Sequential`: chains Modules and plain callables.

Each output feeds the next callable: a tuple is spread as positional
arguments, a dict as keyword arguments, anything else is the one argument.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> from spmdnnx.nn._linear import Linear
>>> model = Sequential(Linear(2, 3, rngs=Rngs(0)), jnp.tanh, Linear(3, 1, rngs=Rngs(1)))
>>> model(jnp.ones((4, 2))).shape
(4, 1)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from spmdnnx import errors
from spmdnnx._module import Module


def _accepts_rngs(fn: Callable) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return "rngs" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Sequential(Module):
  """Calls ``layers`` in order, feeding each output to the next.

  Args:
    *fns: Modules or plain callables (e.g. activation functions).

  Raises:
    ConfigError: if an entry is not callable (at construction).

  An empty Sequential is the identity: ``Sequential()(x) is x``.
  """

  def __init__(self, *fns: Callable):
    for i, fn in enumerate(fns):
      if not callable(fn):
        raise errors.ConfigError(
            f"Sequential: entry {i} is a {type(fn).__name__}, not a callable; "
            "pass Modules or functions.", paths=[str(i)], value=type(fn).__name__)
    self.layers = list(fns)

  def __call__(self, *args: Any, rngs: Any = None, **kwargs: Any) -> Any:
    if not self.layers:
      # No layers: the identity on what was passed (as Flax's empty Sequential).
      if kwargs and not args:
        return kwargs
      return args[0] if len(args) == 1 else (args or None)
    out = None
    for i, fn in enumerate(self.layers):
      if i > 0:
        if isinstance(out, tuple):
          args, kwargs = out, {}
        elif isinstance(out, dict):
          args, kwargs = (), dict(out)
        else:
          args, kwargs = (out,), {}
      if rngs is not None and _accepts_rngs(fn):
        kwargs = {**kwargs, "rngs": rngs}
      out = fn(*args, **kwargs)
    return out
