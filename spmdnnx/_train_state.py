"""`TrainState`: an immutable pytree of graphdef, params, optax state and step.

The functional style of training: the model lives as ``(graphdef, params)``
and each step returns a new state instead of mutating objects. Subclasses add
fields by annotation (``batch_stats: nnx.State``); every field is a pytree
child except ``tx`` (the optax transformation), which is static.

>>> import jax, jax.numpy as jnp, optax
>>> import spmdnnx as nnx
>>> graphdef, params = nnx.split(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), nnx.Param)
>>> ts = TrainState.create(graphdef, params=params, tx=optax.sgd(0.5))
>>> y, _ = ts.apply("params")(jnp.ones((1, 2)))
>>> ts = ts.apply_gradients(jax.tree.map(jnp.ones_like, ts.params))
>>> int(ts.step), y.shape
(1, (1, 1))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from spmdnnx import errors
from spmdnnx._state import State

_STATIC_FIELDS = ("tx",)


def _register(cls: type) -> type:
  cls = dataclasses.dataclass(frozen=True)(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  jax.tree_util.register_dataclass(
      cls, data_fields=[n for n in names if n not in _STATIC_FIELDS],
      meta_fields=[n for n in names if n in _STATIC_FIELDS])
  return cls


class TrainState:
  """graphdef, params, opt_state, step and the optax ``tx`` (static).

  Build one with `create`; subclass it to carry more states (each extra field
  is passed to `create` by keyword).
  """

  graphdef: Any
  params: State
  opt_state: Any
  step: jax.Array
  tx: optax.GradientTransformation

  def __init_subclass__(cls, **kwargs: Any):
    super().__init_subclass__(**kwargs)
    _register(cls)

  @classmethod
  def create(cls, graphdef: Any, *, params: State, tx: optax.GradientTransformation,
             step: int = 0, **kwargs: Any) -> "TrainState":
    """A state at ``step`` with ``tx.init(params)`` as its optimizer state."""
    return cls(graphdef=graphdef, params=params, opt_state=tx.init(params),
               step=jnp.asarray(step), tx=tx, **kwargs)

  def replace(self, **changes: Any) -> "TrainState":
    """A copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  def apply(self, state: State | str, *states: State | str) -> Any:
    """``graphdef.apply`` over the given states (or names of State fields).

    Returns a caller: ``ts.apply("params")(x)`` gives ``(out, (graphdef, state))``.
    """
    chosen = []
    for s in (state, *states):
      if isinstance(s, str):
        value = getattr(self, s, None)
        if not isinstance(value, State):
          raise errors.ArgumentError(
              f"{type(self).__name__}.apply: field '{s}' must hold a State, got "
              f"{type(value).__name__}.", argument=s)
        s = value
      chosen.append(s)
    return self.graphdef.apply(*chosen)

  def apply_gradients(self, grads: State, **changes: Any) -> "TrainState":
    """One optax step: new params, optimizer state and step (plus ``changes``)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(params=params, opt_state=opt_state, step=self.step + 1, **changes)


TrainState = _register(TrainState)
