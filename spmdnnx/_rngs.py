"""Rngs: named random streams whose state lives in Variables.

Each stream holds a base key (`RngKey`) and a counter (`RngCount`); drawing a
key folds the counter into the base key and increments the counter. Because
the counter is a Variable, keys keep advancing across jit boundaries.

>>> rngs = Rngs(0, dropout=1)
>>> k1, k2 = rngs.params(), rngs.params()   # no 'params' stream: uses default
>>> bool((k1 != k2).any()) if hasattr(k1, 'any') else True
True
>>> int(rngs.default.count.value)
2
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _tracectx as tracectx
from spmdnnx._object import Object
from spmdnnx._variables import RngCount, RngKey

DEFAULT = "default"


def as_key(seed: Any, name: str) -> jax.Array:
  if isinstance(seed, (int, jnp.integer)) and not isinstance(seed, bool):
    return jax.random.key(seed)
  if isinstance(seed, jax.Array) or hasattr(seed, "dtype"):
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
      return seed
    if seed.shape == (2,) and seed.dtype == jnp.uint32:
      return jax.random.wrap_key_data(seed)
    if seed.shape == () and jnp.issubdtype(seed.dtype, jnp.integer):
      return jax.random.key(seed)
  raise errors.ConfigError(
      f"Rngs stream {name!r}: seed must be an int, an integer scalar array or a "
      f"PRNG key, got {seed!r}.")


def _raise_captured(tag: str, frame: tracectx.TraceFrame) -> None:
  """Raises for a stream drawn inside a transform its Rngs was not passed to."""
  raise errors.TraceContextError(
      f"Rngs stream {tag!r} was drawn inside {frame.name}, but its Rngs was created "
      "outside it (captured from an enclosing scope), so every vmapped or scanned "
      "slice would get the same keys: identical layers, identical dropout masks. "
      "Pass the Rngs to the transform as an argument instead: e.g. "
      "split_rngs(splits=n) + vmap(in_axes=0) over a constructor that uses its "
      "rngs argument, or a Stack make_block that uses the Rngs it is given.",
      stream=tag, transform=frame.name)


class RngStream(Object):
  """One named stream: ``stream()`` returns a fresh key each call."""

  def __init__(self, key: Any, tag: str, count: Any = 0):
    self.key = RngKey(as_key(key, tag), tag=tag)
    self.count = RngCount(jnp.asarray(count, dtype=jnp.uint32), tag=tag)
    self.tag = tag

  def __call__(self) -> jax.Array:
    frame = tracectx.current_frame()
    if frame is not None and self._object__trace is not frame:
      _raise_captured(self.tag, frame)
    key = jax.random.fold_in(self.key.value, self.count.value)
    self.count.value = self.count.value + jnp.uint32(1)
    return key

  def fork(self, *, split: int | tuple[int, ...] | None = None) -> "RngStream":
    """A new stream seeded from this one (advancing it); `split` batches keys."""
    key = self()
    if split is not None:
      key = jax.random.split(key, split)
    count = jnp.zeros(jnp.shape(key), dtype=jnp.uint32)
    return RngStream(key, self.tag, count)


class Rngs(Object):
  """A set of named random streams.

  Args:
    default: seed for the ``default`` stream (int or key), optional.
    **streams: seeds for named streams, e.g. ``params=0, dropout=1``.

  Asking for a stream that does not exist falls back to ``default``.
  """

  def __init__(self, default: Any = None, /, **streams: Any):
    if isinstance(default, Mapping):
      streams = {**default, **streams}
      default = None
    if default is not None:
      streams = {DEFAULT: default, **streams}
    for name, seed in streams.items():
      if isinstance(seed, RngStream):
        setattr(self, name, seed)
      else:
        setattr(self, name, RngStream(seed, name))

  def _get(self, name: str) -> RngStream:
    d = self.__dict__
    if name in d and isinstance(d[name], RngStream):
      return d[name]
    if DEFAULT in d:
      return d[DEFAULT]
    what = "no 'default' stream" if name == DEFAULT else f"no stream {name!r} and no 'default' stream"
    raise errors.ConfigError(
        f"Rngs has {what}; streams are "
        f"{sorted(self._names())}. Create it, e.g. nnx.Rngs({name}=0), or give a "
        "default seed: nnx.Rngs(0).")

  def __getattr__(self, name: str) -> RngStream:
    if name.startswith("__") or name.startswith("_object__"):
      raise AttributeError(name)
    return self._get(name)

  def __getitem__(self, name: str) -> RngStream:
    return self._get(name)

  def __call__(self) -> jax.Array:
    return self._get(DEFAULT)()

  def __contains__(self, name: str) -> bool:
    return isinstance(self.__dict__.get(name), RngStream)

  def _names(self) -> list[str]:
    return [k for k, v in self.__dict__.items() if isinstance(v, RngStream)]

  def __iter__(self) -> Iterator[str]:
    return iter(self._names())

  def __len__(self) -> int:
    return len(self._names())

  def items(self):
    return [(k, self.__dict__[k]) for k in self._names()]

  def fork(self, *, split: Any = None) -> "Rngs":
    """New Rngs seeded from these streams (which advance).

    Args:
      split: None (one key per stream), an int or shape (every stream gets
        a batch of keys, for vmap/scan), or a mapping ``{filter: n}`` choosing
        the split per stream (streams matching no filter are not split).
    """
    forked = {}
    for name, stream in self.items():
      n = split
      if isinstance(split, Mapping):
        n = None
        for filt, size in split.items():
          if filterlib.to_predicate(filt)((name,), stream):
            n = size
            break
      forked[name] = stream.fork(split=n)
    return Rngs(**forked)

  def split(self, n: int) -> "Rngs":
    """Shorthand for ``fork(split=n)``."""
    return self.fork(split=n)

