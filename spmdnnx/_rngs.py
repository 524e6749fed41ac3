"""Rngs: named random streams whose state lives in Variables.

Each stream holds a base key (`RngKey`) and a counter (`RngCount`); drawing a
key folds the counter into the base key, ``fold_in(key, count)``, and then
increments the counter, exactly as Flax NNX does, so the same seeds give the
same keys (and the same initial parameters) as Flax. Because the counter is a
Variable, keys keep advancing across jit boundaries.

>>> rngs = Rngs(0, dropout=1)
>>> k1, k2 = rngs.params(), rngs.params()   # no 'params' stream: uses default
>>> int(rngs.default.count.value)
2
>>> rngs.normal((2,)).shape       # every jax.random sampler, on a fresh key
(2,)
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.extend
import jax.numpy as jnp
from jax.nn import initializers as jinit

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _tracectx as tracectx
from spmdnnx._object import Object
from spmdnnx._variables import RngCount, RngKey

DEFAULT = "default"


def as_key(seed: Any, name: str) -> jax.Array:
  """A typed PRNG key from an int, an integer scalar, raw uint32 key data or a key.

  Raises:
    ConfigError: for anything else.
  """
  if isinstance(seed, (int, jnp.integer)) and not isinstance(seed, bool):
    return jax.random.key(seed)
  if isinstance(seed, jax.Array) or hasattr(seed, "dtype"):
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
      return seed
    if seed.dtype == jnp.uint32 and seed.ndim >= 1 and seed.shape[-1] == 2:
      return jax.random.wrap_key_data(seed)
    if seed.shape == () and jnp.issubdtype(seed.dtype, jnp.integer):
      return jax.random.key(seed)
  raise errors.ConfigError(
      f"Rngs stream {name!r}: seed must be an int, an integer scalar array or a "
      f"PRNG key, got {seed!r}.", stream=name)


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


#: The JAX trace each stream was created under (streams rebuilt by a graph
#: merge are not listed: spmdnnx's transforms check them with their frames).
_BORN_IN: "weakref.WeakKeyDictionary[RngStream, Any]" = weakref.WeakKeyDictionary()


def _jax_trace() -> Any:
  return jax.extend.core.get_opaque_trace_state(convention="nnx")


def _check_jax_trace(stream: "RngStream") -> None:
  """Raises if `stream` is drawn under a plain JAX transform it was not created in."""
  born = _BORN_IN.get(stream)
  if born is not None and born != _jax_trace():
    raise errors.TraceContextError(
        f"Cannot mutate RngCount from a different trace level: Rngs stream "
        f"{stream.tag!r} was created outside the jax transform (jax.jit, "
        "jax.vmap, ...) that draws from it, so the drawn key would be baked in "
        "as a constant (the same key on every call) and the counter would hold "
        "a tracer. Pass the Rngs (or its state) into the function, or use "
        "spmdnnx's lifted transforms (nnx.jit, nnx.vmap, ...).",
        stream=stream.tag)


def _as_shape(k: int | tuple) -> tuple:
  return (k,) if isinstance(k, int) else tuple(k)


# --- samplers: every jax.random function and the keyed initializers ----------------

#: jax.random functions exposed as ``stream.name(*args)`` == ``name(stream(), *args)``.
SAMPLERS = (
    "bits", "uniform", "randint", "permutation", "choice", "normal",
    "multivariate_normal", "truncated_normal", "bernoulli", "beta", "cauchy",
    "dirichlet", "exponential", "gamma", "loggamma", "poisson", "gumbel",
    "categorical", "laplace", "logistic", "pareto", "t", "chisquare", "f",
    "rademacher", "maxwell", "double_sided_maxwell", "weibull_min", "orthogonal",
    "generalized_normal", "ball", "rayleigh", "wald", "geometric", "triangular",
    "lognormal", "binomial", "multinomial")

#: initializer constructors exposed as ``stream.name(**cfg)(shape, dtype)``
#: (the names that do not clash with a sampler).
INITIALIZERS = (
    "delta_orthogonal", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
    "kaiming_normal", "kaiming_uniform", "lecun_normal", "lecun_uniform",
    "variance_scaling", "xavier_normal", "xavier_uniform")


def _sampler(name: str) -> Callable:
  fn = getattr(jax.random, name)

  def method(self, *args, **kwargs):
    return fn(self(), *args, **kwargs)

  method.__name__ = name
  method.__doc__ = f"``jax.random.{name}`` on the next key of this stream."
  return method


def _initializer(name: str) -> Callable:
  make = getattr(jinit, name)

  def method(self, *args, **kwargs):
    init = make(*args, **kwargs)

    def keyless(*shape_args, **shape_kwargs):
      return init(self(), *shape_args, **shape_kwargs)

    return keyless

  method.__name__ = name
  method.__doc__ = (f"``jax.nn.initializers.{name}(...)`` as a keyless initializer "
                    "``(shape, dtype) -> array`` that draws a key from this stream.")
  return method


class _Sampling:
  """Mixin: the samplers and keyless initializers, drawing keys from ``self()``."""

  __slots__ = ()


for _name in SAMPLERS:
  setattr(_Sampling, _name, _sampler(_name))
for _name in INITIALIZERS:
  setattr(_Sampling, _name, _initializer(_name))


class RngStream(_Sampling, Object):
  """One named stream: ``stream()`` returns a fresh key each call.

  Args:
    key: an int seed, a PRNG key (possibly batched) or raw uint32 key data.
    tag: the stream's name.
    count: the starting counter (default zeros, one per key).

  >>> s = RngStream(0, tag="params")
  >>> import jax
  >>> bool((jax.random.key_data(s()) == jax.random.key_data(
  ...     jax.random.fold_in(jax.random.key(0), 0))).all())
  True
  >>> s.split(4).key.shape, s.broadcast(3).key.shape
  ((4,), (3,))
  """

  def __init__(self, key: Any, tag: str | None = None, count: Any = None):
    tag = DEFAULT if tag is None else tag
    key = as_key(key, tag)
    if count is None:
      count = jnp.zeros(key.shape, dtype=jnp.uint32)
    self.tag = tag
    self.key = RngKey(key, tag=tag)
    self.count = RngCount(jnp.asarray(count, dtype=jnp.uint32), tag=tag)
    _BORN_IN[self] = _jax_trace()

  def __call__(self) -> jax.Array:
    frame = tracectx.current_frame()
    if frame is None:
      _check_jax_trace(self)
    elif self._object__trace is not frame:
      _raise_captured(self.tag, frame)
    count = self.count.raw_value
    key = jax.random.fold_in(self.key.raw_value, count)
    self.count.value = count + jnp.uint32(1)
    return key

  def split(self, k: int | tuple[int, ...]) -> "RngStream":
    """A new stream whose key is ``k`` keys split from this stream's next key."""
    return type(self)(jax.random.split(self(), k), tag=self.tag)

  def fork(self, *, split: int | tuple[int, ...] | None = None) -> "RngStream":
    """A new stream seeded with this stream's next key (``split`` batches it)."""
    key = self()
    if split is not None:
      key = jax.random.split(key, split)
    return type(self)(key, tag=self.tag)

  def broadcast(self, k: int | tuple[int, ...]) -> "RngStream":
    """A new stream holding this stream's next key repeated to shape ``k``."""
    key = self()
    return type(self)(jnp.broadcast_to(key, _as_shape(k) + key.shape), tag=self.tag)

  def __repr__(self) -> str:
    return (f"RngStream(tag={self.tag!r}, key={_key_repr(self.key.raw_value)}, "
            f"count={_count_repr(self.count.raw_value)})")


def _key_repr(key: Any) -> str:
  if isinstance(key, jax.core.Tracer) or not isinstance(key, jax.Array):
    return f"<key shape {tuple(getattr(key, 'shape', ()))}>"
  if key.shape == ():
    return f"key({jax.random.key_data(key).tolist()})"
  return f"keys(shape={tuple(key.shape)})"


def _count_repr(count: Any) -> str:
  if isinstance(count, jax.core.Tracer) or not isinstance(count, jax.Array) \
      or count.size != 1:
    return f"<shape {tuple(getattr(count, 'shape', ()))}>"
  return str(int(count))


def _missing(name: str, names: list[str], error: type = errors.MissingStreamError):
  what = "" if name == DEFAULT else " (and no 'default' stream)"
  return error(
      f"No RngStream named {name!r} found in Rngs{what}; streams are "
      f"{sorted(names)}. Create it, e.g. "
      f"nnx.Rngs({name}=0), or give a default seed: nnx.Rngs(0).", stream=name)


def _split_map(k: Any) -> list:
  """``{filter: size}`` from an int / shape / None / mapping, as predicates."""
  if k is None or isinstance(k, (int, tuple)):
    k = {...: k}
  return [(filterlib.to_predicate(f), n) for f, n in k.items()]


class Rngs(_Sampling, Object):
  """A set of named random streams.

  Args:
    default: seed (int or key) of the ``default`` stream, or a mapping of
      stream names to seeds.
    **streams: seeds for named streams, e.g. ``params=0, dropout=1``. An
      `RngStream` given as a seed contributes its base key (its counter
      starts again at 0, as in Flax).

  Asking for a stream that does not exist falls back to ``default``; without
  one, `MissingStreamError` (an AttributeError and a KeyError) is raised.
  ``rngs.normal(shape)`` and the other jax.random samplers draw from the
  ``default`` stream; ``rngs.params.uniform(...)`` from a named one.

  >>> rngs = Rngs(params=0, dropout=1)
  >>> sorted(rngs)
  ['dropout', 'params']
  >>> rngs.split({"params": 4}).params.key.shape
  (4,)
  """

  def __init__(self, default: Any = None, /, **streams: Any):
    if default is not None:
      if isinstance(default, Mapping):
        streams = {**default, **streams}
      else:
        streams[DEFAULT] = default
    for name, seed in streams.items():
      if isinstance(seed, RngStream):
        seed = seed.key.raw_value
      setattr(self, name, RngStream(seed, name))

  def _get(self, name: str) -> RngStream:
    d = self.__dict__
    stream = d.get(name)
    if isinstance(stream, RngStream):
      return stream
    stream = d.get(DEFAULT)
    if isinstance(stream, RngStream):
      return stream
    raise _missing(name, self._names())

  def __getattr__(self, name: str) -> RngStream:
    if name.startswith("__") or name.startswith("_object__"):
      raise AttributeError(name)
    return self._get(name)

  def __getitem__(self, name: str) -> RngStream:
    return self._get(name)

  def __call__(self) -> jax.Array:
    return self._get(DEFAULT)()

  def __contains__(self, name: Any) -> bool:
    return isinstance(self.__dict__.get(name), RngStream)

  def _names(self) -> list[str]:
    return [k for k, v in self.__dict__.items() if isinstance(v, RngStream)]

  def __iter__(self) -> Iterator[str]:
    return iter(self._names())

  def __len__(self) -> int:
    return len(self._names())

  def items(self):
    return [(k, self.__dict__[k]) for k in self._names()]

  def _map(self, how: Any, op: Callable) -> "Rngs":
    """New Rngs: the first matching ``(predicate, size)`` of `how` applies `op`."""
    rules = _split_map(how)
    out = {}
    for name, stream in self.items():
      for pred, n in rules:
        if pred((name,), stream):
          out[name] = stream if n is None else op(stream, n)
          break
      else:
        out[name] = stream
    return Rngs(**out)

  def split(self, k: Any) -> "Rngs":
    """New Rngs whose streams hold ``k`` keys split from each stream's next key.

    Args:
      k: an int or shape (every stream), or a mapping ``{filter: k or None}``
        (first matching filter wins; None or no match: the stream's base key
        is carried over with a fresh counter).
    """
    return self._map(k, RngStream.split)

  def broadcast(self, k: Any) -> "Rngs":
    """New Rngs whose streams hold each stream's next key repeated to shape ``k``.

    ``k`` is as for `split`.
    """
    return self._map(k, RngStream.broadcast)

  def fork(self, *, split: Any = None) -> "Rngs":
    """New Rngs seeded with each stream's next key (these streams advance).

    Args:
      split: None (one key per stream), an int or shape (every stream gets
        a batch of keys, for vmap/scan), or a mapping ``{filter: n}`` choosing
        the split per stream (streams matching no filter get one key).
    """
    rules = _split_map(split) if split is not None else []
    forked = {}
    for name, stream in self.items():
      n = None
      for pred, size in rules:
        if pred((name,), stream):
          n = size
          break
      forked[name] = stream.fork(split=n)
    return Rngs(**forked)

  def __repr__(self) -> str:
    inner = ", ".join(f"{name}={stream!r}" for name, stream in self.items())
    return f"Rngs({inner})"
