"""`Dropout`: zeroes a random fraction of activations while training.

The layer keeps its own random stream (forked from ``rngs`` at construction),
so successive calls, also across `jit`, draw fresh masks. Evaluation mode
(``deterministic=True``, set by ``model.eval()``) is the identity.

>>> import jax.numpy as jnp
>>> from spmdnnx._rngs import Rngs
>>> drop = Dropout(0.5, rngs=Rngs(dropout=0))
>>> y = drop(jnp.ones((4, 4)))
>>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
True
>>> bool((drop(jnp.ones(3), deterministic=True) == 1).all())
True
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx._module import Module
from spmdnnx.nn import _common
from spmdnnx._rngs import Rngs, RngStream


def draw_key(owner: str, collection: str, call_rngs: Any, own: Any) -> jax.Array:
  """A key from the call-time rngs (Rngs, stream or key), else the layer's own stream.

  Raises:
    ConfigError: when neither is available.
  """
  source = call_rngs if call_rngs is not None else own
  if isinstance(source, Rngs):
    return source[collection]()
  if isinstance(source, RngStream):
    return source()
  if source is not None:
    return source
  raise errors.ConfigError(
      f"`deterministic` is False, but no `rngs` argument was provided to {owner}: "
      f"random dropout needs a key. Pass "
      f"rngs=nnx.Rngs({collection}=0) at construction or call time, or run "
      "deterministically (deterministic=True, or model.eval()).", argument="rngs")


def own_stream(rngs: Any, collection: str) -> RngStream | None:
  """The stream a layer keeps: a fork of ``rngs[collection]`` (or None)."""
  if isinstance(rngs, Rngs):
    return rngs[collection].fork()
  if isinstance(rngs, RngStream):
    return rngs
  return None


def dropout(x: jax.Array, rate: float, key: jax.Array,
            broadcast_dims: Sequence[int] = ()) -> jax.Array:
  """Zeroes each entry with probability `rate`, scaling the rest by 1/(1-rate)."""
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = 1.0 - rate
  shape = list(x.shape)
  for d in broadcast_dims:
    shape[d] = 1
  mask = jax.random.bernoulli(key, keep, shape)
  mask = jnp.broadcast_to(mask, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class Dropout(Module):
  """Randomly zeroes inputs with probability `rate` (scaled to keep the mean).

  Args:
    rate: drop probability in [0, 1].
    broadcast_dims: axes along which the mask is shared (e.g. time steps).
    deterministic: default mode; True makes the layer the identity.
    rng_collection: the Rngs stream keys are drawn from (``"dropout"``).
    rngs: an `Rngs` (or one stream); the layer forks and keeps its own stream.

  Raises:
    ConfigError: for a rate outside [0, 1].
  """

  def __init__(self, rate: float, *, broadcast_dims: Sequence[int] = (),
               deterministic: bool = False, rng_collection: str = "dropout",
               rngs: Rngs | RngStream | None = None):
    if not 0.0 <= rate <= 1.0:
      raise errors.ConfigError(
          f"Dropout: rate must be a probability in [0, 1], got {rate}.",
          argument="rate", value=rate)
    _common.set_attrs(self, rate=rate, broadcast_dims=tuple(broadcast_dims),
                      deterministic=deterministic, rng_collection=rng_collection,
                      rngs=own_stream(rngs, rng_collection))

  def set_view(self, deterministic: bool | None = None) -> None:
    """Sets the layer's default mode (used by ``nnx.view``).

    Args:
      deterministic: True makes the layer the identity; None keeps it.
    """
    if deterministic is not None:
      self.deterministic = deterministic

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: Any = None) -> jax.Array:
    """Applies dropout; `deterministic` and `rngs` override the layer's own."""
    if deterministic is None:
      deterministic = self.deterministic
    if deterministic or self.rate == 0.0:
      return inputs
    key = draw_key("Dropout", self.rng_collection, rngs, self.rngs)
    return dropout(inputs, self.rate, key, self.broadcast_dims)
